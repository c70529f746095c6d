"""Reinforcement learning from verifiable rewards (`rl:`): GRPO or RLOO
on prompts, with LoRA (the reference: the adapters off) or every weight."""

import os

from kft.lora.io import load_adapter
from kft.recipes import builders
from kft.recipes.errors import RecipeError
from kft.recipes.tasks.causal_lm import CausalLMSFT
from kft.rl.data import PromptDataset
from kft.rl.data import arithmetic_prompts
from kft.rl.data import render_prompts
from kft.rl.data import split_prompts
from kft.rl.model import RLCausalLM
from kft.rl.rewards import RewardSpec
from kft.rl.rewards import get_reward
from kft.rl.rollout import RolloutConfig
from kft.rl.trainer import evaluate_rewards

__all__ = ["RLTuning", "rl_prompts"]

SAMPLES = "samples.jsonl"  # every training completion, with its reward
_SHOWN = 8  # held-out greedy samples kept in samples.json, before and after


def _rewards(config):
    specs = []
    for i, reward in enumerate(config.rl.rewards):
        try:
            function = get_reward(reward.name, **reward.options)
        except ValueError as error:
            raise RecipeError(f"rl.rewards[{i}]: {error}") from None
        specs.append(RewardSpec(function, reward.weight, reward.name))
    return specs


def _model(config, lm):
    rl = config.rl
    rollout = RolloutConfig(
        num_generations=rl.num_generations, max_new_tokens=rl.max_new_tokens,
        max_prompt_length=rl.max_prompt_length, temperature=rl.temperature,
        top_p=rl.top_p)
    try:
        return RLCausalLM(
            lm, _rewards(config), rollout=rollout, loss_type=rl.loss_type,
            advantage="rloo" if rl.algorithm == "rloo" else "group",
            beta=rl.beta, epsilon=rl.epsilon, epsilon_high=rl.epsilon_high,
            num_iterations=rl.num_iterations, seed=config.seed)
    except ValueError as error:
        raise RecipeError(f"rl: {error}") from None


def rl_prompts(config, lm, smoke=False):
    """`(train, held_out)` prompt records of an `rl:` recipe, rendered with
    the model's chat template when `rl.chat` (and it has one)."""
    from kft.data.sft import read_records

    data = config.data
    count = 8 if smoke else data.max_examples
    try:
        if data.source == "arithmetic":
            records = arithmetic_prompts(count or 256, seed=config.seed)
        else:
            records = read_records(data.path)[:count]
    except (OSError, ValueError) as error:
        raise RecipeError(f"data: {error}") from None
    if config.rl.chat and getattr(lm, "chat_template", None):
        records = render_prompts(lm, records)
    return split_prompts(records, data.validation_split, config.seed)


class RLTuning(CausalLMSFT):
    """A causal LM trained by GRPO / RLOO inside `kft.rl.RLCausalLM`:
    held-out mean reward of greedy completions before (`val_before`) and
    after (`val`), every training completion in `samples.jsonl`, greedy
    held-out samples before and after in `samples.json`, adapters in kft's
    and PEFT's format."""

    name = "causal_lm_rl"
    default_methods = ()
    methods = ()

    def matches(self, config):
        return config.model.causal_lm is not None and config.rl is not None

    def build_model(self, config, bundle, input_shape, load_weights):
        return _model(config, builders.causal_model(config).lm)

    def setup_after_model(self, run):
        """Prompts from the recipe, and the held-out reward before training."""
        config, model = run.config, run.model
        train, held_out = rl_prompts(config, model.lm, run.smoke)
        if not train:
            raise RecipeError("data: no training prompts left after "
                              "data.validation_split")
        from kft.data.arrays import DataBundle

        run.bundle = DataBundle(
            PromptDataset(train, config.data.batch_size, config.data.shuffle,
                          config.seed), None, [], ())
        run.held_out = held_out
        run.data_ready()
        model.samples_path = run.path(SAMPLES)
        if held_out and not run.smoke:
            run.before, shown = self._evaluate(run)
            run.samples = {"before": shown}

    def _evaluate(self, run):
        try:
            metrics, samples = evaluate_rewards(run.model, run.held_out,
                                                run.config.rl.eval_batch_size)
        except ValueError as error:
            raise RecipeError(f"rl: {error}") from None
        return metrics, samples[:_SHOWN]

    def finalize(self, run):
        """Adapters, plots, the held-out reward after training, samples."""
        from kft.recipes.causal import variable_bytes
        from kft.recipes.checkpoint import read_history
        from kft.training import report

        saved = self._save(run)
        rows = read_history(run.path("history.csv"))
        report.plot_curves(rows, run.path("plots", "curves.png"))
        evaluation = {}
        if run.held_out:
            evaluation, shown = self._evaluate(run)
            run.samples["after"] = shown
            report.write_metrics(run.path("samples.json"), run.samples)
        metrics = run.metrics(rows, evaluation)
        final = metrics["final"]
        # The held-out prompts are not a Keras validation set (the bundle
        # has none): their reward is the run's `val`.
        final["val" if run.held_out else "train_eval"] = final.pop("train_eval")
        if rows:
            metrics["final"]["train"] = {
                k: v for k, v in rows[-1].items()
                if k in ("loss", "reward", "kl", "clip_fraction", "reward_std")}
        if run.before is not None:
            metrics["final"]["val_before"] = run.before
        metrics.update(saved, model_bytes=variable_bytes(run.model))
        return metrics

    def load_run(self, run_dir, config):
        """The base rebuilt from its recipe inside an `RLCausalLM` (with the
        recipe's rewards), then the run's adapters or weights."""
        name = "adapter.npz" if config.lora else "model.weights.h5"
        path = os.path.join(run_dir, name)
        if not os.path.exists(path):
            raise RecipeError(f"{run_dir!r} is not a finished RL run (no {name}).")
        model = _model(config, builders.causal_model(config).lm)
        if config.lora:
            load_adapter(model.lm, path)
        else:
            model.lm.load_weights(path)
        return model

    def evaluate_run(self, run_dir, config, model, data_path=None):
        """Held-out mean reward of greedy completions (`eval.json`), on the
        recipe's held-out prompts or on `data_path` (prompt records)."""
        if data_path:
            from kft.data.sft import read_records

            try:
                prompts = read_records(data_path)
            except (OSError, ValueError) as error:
                raise RecipeError(f"--data: {error}") from None
            if config.rl.chat and getattr(model.lm, "chat_template", None):
                prompts = render_prompts(model.lm, prompts)
        else:
            _, prompts = rl_prompts(config, model.lm)
        if not prompts:
            raise RecipeError("kft eval: no held-out prompts (data."
                              "validation_split is 0); pass --data")
        try:
            metrics, _ = evaluate_rewards(model, prompts,
                                          config.rl.eval_batch_size)
        except ValueError as error:
            raise RecipeError(f"rl: {error}") from None
        return metrics

    def method_changes(self, method, epochs, base):
        return None, "kft compare does not compare RL methods yet"
