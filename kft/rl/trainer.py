"""The RL training loop behind `RLCausalLM.fit`: rollouts, rewards,
log-probabilities, updates, metrics and samples; and held-out reward.

Each step draws the next batch of prompts, samples `G` completions each,
scores them, and takes `num_iterations` optimizer steps on them. Which
prompts and which random draw a step gets depend on the step's number
alone (`optimizer.iterations // num_iterations`), so a run resumed from a
checkpoint (which keeps the optimizer's iteration count) continues
exactly as the uninterrupted run would have.

Metrics per epoch (TRL's, with `_` for `/`): `loss`, `reward`,
`reward_<name>` per reward function, `reward_std` (the std of the rewards
within a group, averaged over groups), `zero_std_fraction` (groups whose
rewards are all equal: no signal), `kl`, `clip_fraction`,
`completion_length` (tokens), and where the time goes:
`generation_seconds`, `logps_seconds`, `update_seconds` (per step).
"""

import json
import math
import time

import keras
import numpy as np

from kft.rl.data import PromptDataset
from kft.rl.objective import group_advantages
from kft.rl.objective import rloo_advantages
from kft.rl.rewards import score_rewards

__all__ = ["evaluate_rewards", "fit_prompts", "rl_step"]

_TIMES = ("generation_seconds", "logps_seconds", "update_seconds")


def _columns(records, repeat):
    """`{column: value per completion}`: every field but `prompt`."""
    keys = [k for k in records[0] if k != "prompt"] if records else []
    return {k: [r.get(k) for r in records for _ in range(repeat)] for k in keys}


def _group_stats(rewards, group_size):
    groups = np.asarray(rewards, "float64").reshape(-1, group_size)
    spread = groups.std(axis=1)
    return float(spread.mean()), float(np.mean(spread < 1e-8))


def _score(model, records, completions, repeat):
    prompts = [r["prompt"] for r in records for _ in range(repeat)]
    return score_rewards(model.rewards, prompts, completions,
                         _columns(records, repeat), model.reward_weights)


def rl_step(model, records, step):
    """One GRPO / RLOO step on a batch of prompt records.

    Args:
        model: a compiled `RLCausalLM`.
        records: prompt records (`{"prompt": str, ...columns}`).
        step: the step's number (fixes the sampling draw).

    Returns:
        `(logs, samples)`: the step's metrics, and its completions with
        their rewards and advantages.
    """
    group = model.rollout.num_generations
    started = time.perf_counter()
    rollouts = model.generator().generate([r["prompt"] for r in records], step)
    generated = time.perf_counter()
    total, per_reward = _score(model, records, rollouts.completions, group)
    if model.advantage == "rloo":
        advantages = rloo_advantages(total, group)
    else:
        advantages = group_advantages(total, group, scale=model.scale_rewards)
    x = rollouts.training_inputs(advantages)
    scored = time.perf_counter()
    if any(model.needs_logps().values()):
        x.update(model.score(x))
    logged = time.perf_counter()
    for _ in range(model.num_iterations):
        logs = model.train_on_batch(x, return_dict=True)
    updated = time.perf_counter()
    reward_std, zero_std = _group_stats(total, group)
    logs = {key: float(value) for key, value in logs.items()}
    logs.update(reward=float(total.mean()), reward_std=reward_std,
                zero_std_fraction=zero_std,
                completion_length=float(rollouts.lengths().mean()),
                generation_seconds=generated - started,
                logps_seconds=logged - scored, update_seconds=updated - logged)
    logs.update({f"reward_{name}": float(v.mean()) for name, v in per_reward.items()})
    samples = [{"step": int(step), "prompt": records[i // group]["prompt"],
                "completion": text, "reward": float(total[i]),
                "advantage": float(advantages[i])}
               for i, text in enumerate(rollouts.completions)]
    return logs, samples


def evaluate_rewards(model, prompts, batch_size=8):
    """Mean reward of greedy completions of held-out prompts.

    Args:
        model: an `RLCausalLM` (with its rewards).
        prompts: a `PromptDataset` or a list of prompt records.
        batch_size: prompts per generation batch (the last batch is padded
            with repeats, so generation is traced once).

    Returns:
        `(metrics, samples)`: `{"reward", "reward_<name>",
        "completion_length"}` and `[{"prompt", "completion", "reward"}]`.
    """
    records = list(getattr(prompts, "records", prompts))
    if not records:
        raise ValueError("evaluate_rewards: no prompts")
    generator = model.generator(greedy=True)
    completions, lengths = [], []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        rollouts = generator.generate([r["prompt"] for r in padded], repeat=False)
        completions += rollouts.completions[:len(chunk)]
        lengths += list(rollouts.lengths()[:len(chunk)])
    total, per_reward = _score(model, records, completions, 1)
    metrics = {"reward": round(float(total.mean()), 5)}
    metrics.update({f"reward_{name}": round(float(v.mean()), 5)
                    for name, v in per_reward.items()})
    metrics["completion_length"] = round(float(np.mean(lengths)), 3)
    samples = [{"prompt": r["prompt"], "completion": c, "reward": float(t)}
               for r, c, t in zip(records, completions, total)]
    return metrics, samples


class _Means:
    """Running means of a step's logs over an epoch."""

    def __init__(self):
        self.sums, self.count = {}, 0

    def add(self, logs):
        self.count += 1
        for key, value in logs.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def result(self):
        return {key: value / max(self.count, 1) for key, value in self.sums.items()}


def _write_samples(path, samples):
    if path:
        with open(path, "a", encoding="utf-8") as f:
            for sample in samples:
                f.write(json.dumps(sample) + "\n")


def _prompts(x):
    if isinstance(x, PromptDataset):
        return x
    if isinstance(x, (list, tuple)):
        return PromptDataset(list(x))
    raise ValueError("RLCausalLM.fit trains on prompts: a kft.rl.PromptDataset "
                     f"or a list of {{'prompt': ...}} records. Received: {type(x)}")


def _epoch(model, prompts, steps, callback_list, epoch):
    means = _Means()
    for batch in range(steps):
        callback_list.on_train_batch_begin(batch)
        iterations = keras.ops.convert_to_numpy(model.optimizer.iterations)
        step = int(iterations) // model.num_iterations
        logs, samples = rl_step(model, prompts.batch(step), step)
        _write_samples(model.samples_path, samples)
        means.add(logs)
        callback_list.on_train_batch_end(batch, logs)
        if model.stop_training:
            break
    logs = means.result()
    logs.update({m.name: float(m.result()) for m in model.metrics
                 if m.name in ("loss", "kl", "clip_fraction")})
    return logs


def fit_prompts(model, x, *, epochs=1, initial_epoch=0, steps_per_epoch=None,
                callbacks=None, validation_data=None, verbose="auto"):
    """`RLCausalLM.fit`: epochs of `rl_step`s with Keras callbacks.

    Returns:
        The `keras.callbacks.History`.
    """
    if model.rewards is None:
        raise ValueError("RLCausalLM has no rewards: pass rewards= (a reloaded "
                         "model does not keep its reward functions)")
    if not model.compiled:
        model.compile()
    prompts = _prompts(x)
    steps = steps_per_epoch or math.ceil(len(prompts) / prompts.batch_size)
    callback_list = keras.callbacks.CallbackList(
        callbacks, add_history=True, add_progbar=verbose != 0, model=model,
        verbose=1 if verbose == "auto" else verbose, epochs=epochs, steps=steps)
    model.stop_training = False
    callback_list.on_train_begin()
    logs = {}
    for epoch in range(initial_epoch, epochs):
        model.reset_metrics()
        callback_list.on_epoch_begin(epoch)
        logs = _epoch(model, prompts, steps, callback_list, epoch)
        if validation_data is not None:
            held_out, _ = evaluate_rewards(model, validation_data)
            logs.update({f"val_{k}": v for k, v in held_out.items()})
        callback_list.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callback_list.on_train_end(logs)
    return model.history
