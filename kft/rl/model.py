"""GRPO and RLOO for a keras-hub causal LM, as a Keras model.

`RLCausalLM(lm, rewards)` shares every weight with `lm` (train it, then
`lm.generate`). Its `fit` takes prompts (`kft.rl.PromptDataset`) instead
of tensors and, for each batch of prompts:

1. samples `G` completions per prompt with the policy (`RolloutGenerator`:
   keras-hub's cached generation);
2. scores them with the reward functions (`kft.rl.rewards`) and turns the
   rewards into advantages (`group`: GRPO, `rloo`: leave-one-out);
3. computes, in one compiled pass without gradients, the log-probabilities
   of the completion tokens under the sampling policy (when
   `num_iterations > 1`) and under the reference: the same model with its
   LoRA adapters switched off (`kft.lora.adapters_disabled`), no second
   copy of the weights;
4. takes `num_iterations` optimizer steps on the batch
   (`train_on_batch`: Keras' compiled train step), each with the clipped
   ratio loss of `kft.rl.objective.policy_loss`.

Keras callbacks run as in `fit` (history, checkpoints, early stopping);
the training loop is `kft.rl.trainer`.
"""

import keras
from keras import ops

from kft.backbones.anatomy import Anatomy
from kft.lora import adapters_disabled
from kft.lora import lora_layers
from kft.losses.causal_lm import chunked_sparse_cross_entropy
from kft.rl.objective import ADVANTAGES
from kft.rl.objective import LOSS_TYPES
from kft.rl.objective import policy_loss
from kft.rl.rollout import RolloutConfig
from kft.rl.rollout import RolloutGenerator
from kft.sft.model import lm_wrapper_from_config
from kft.utils.validation import check_one_of

__all__ = ["RLCausalLM", "token_logps"]


def token_logps(logits, targets, temperature=1.0):
    """Per-token log-probabilities of `targets` under `logits / temperature`
    (float32, never a float32 copy of all the logits at once)."""
    if temperature not in (0, 1):
        logits = logits / ops.cast(temperature, logits.dtype)
    return -chunked_sparse_cross_entropy(targets, logits)


def _check(loss_type, advantage, beta, num_iterations, lm):
    check_one_of("loss_type", loss_type, LOSS_TYPES)
    check_one_of("advantage", advantage, ADVANTAGES)
    if not isinstance(num_iterations, int) or num_iterations < 1:
        raise ValueError("num_iterations must be a positive integer. "
                         f"Received: num_iterations={num_iterations!r}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0. Received: beta={beta!r}")
    if beta and not lora_layers(lm):
        raise ValueError(
            "beta > 0 penalises the KL to the reference, the model with its "
            "LoRA adapters switched off, and this model has none: apply LoRA "
            "first (kft.lora.apply_lora) or set beta=0.")


class _Untracked:
    """Holds the scorer out of Keras' tracking: it shares `lm`, whose
    weights are the model's own (saved once, under `lm`)."""

    def __init__(self, model):
        self.model = model


class _Scorer(keras.Model):
    """The log-probabilities a batch of rollouts needs before its updates,
    as a model of its own: Keras' `predict_on_batch` compiles its `call`
    on every backend (a `predict_step` override would be backend-specific)."""

    def __init__(self, lm, needs, temperature):
        super().__init__(name=f"{lm.name}_scorer")
        self.lm, self.needs, self.temperature = lm, needs, temperature

    def _logps(self, x):
        logits = self.lm({"token_ids": x["token_ids"],
                          "padding_mask": x["padding_mask"]}, training=False)
        return ops.stop_gradient(token_logps(logits, x["targets"],
                                             self.temperature))

    def call(self, x):
        out = {}
        if self.needs["old_logps"]:
            out["old_logps"] = self._logps(x)
        if self.needs["ref_logps"]:
            # The same weights, traced without the adapters' work: nothing
            # retraces, and the pass costs the base alone.
            with adapters_disabled(self.lm):
                out["ref_logps"] = self._logps(x)
        return out


@keras.saving.register_keras_serializable(package="kft")
class RLCausalLM(keras.Model):
    """A keras-hub causal LM trained by reinforcement learning from
    verifiable rewards (GRPO, Dr. GRPO, DAPO, RLOO).

    Args:
        lm: a keras-hub `CausalLM` with its preprocessor (LoRA applied
            first for a KL penalty: the reference is the adapters off).
        rewards: a reward function `reward(prompts, completions,
            **columns) -> list[float]`, a list of them, or
            `kft.rl.rewards.RewardSpec`s (not saved with the model).
        reward_weights: one weight per reward (default 1 each).
        rollout: a `kft.rl.RolloutConfig` (G, temperature, top-p, lengths).
        loss_type: `"grpo"`, `"dr_grpo"` or `"dapo"` (how token losses are
            averaged, `kft.rl.objective`).
        advantage: `"group"` (GRPO) or `"rloo"` (leave-one-out baseline).
        scale_rewards: divide group advantages by the group's std (default:
            yes, except for `dr_grpo`).
        beta: the KL penalty's weight (0: no reference pass).
        epsilon: the ratio's clip, `1 +- epsilon`.
        epsilon_high: the upper clip when it differs (DAPO: 0.28).
        num_iterations: optimizer steps per batch of rollouts (`mu`).
        seed: the sampling seed (each batch's draw is fixed by it and the
            step).
        name: the model's name.

    Example:

    ```python
    kft.lora.apply_lora(lm, targets="all-linear", rank=8)
    model = kft.rl.RLCausalLM(lm, [kft.rl.rewards.format_reward(r"\\d+")],
                              rollout=kft.rl.RolloutConfig(num_generations=8))
    model.compile(optimizer=keras.optimizers.Adam(1e-4))
    model.fit(kft.rl.PromptDataset(records, batch_size=4), epochs=1,
              steps_per_epoch=10)
    ```
    """

    computes_own_loss = True  # `kft.fine_tune` compiles it with loss="auto"

    def __init__(self, lm, rewards=None, *, reward_weights=None, rollout=None,
                 loss_type="grpo", advantage="group", scale_rewards=None,
                 beta=0.04, epsilon=0.2, epsilon_high=None, num_iterations=1,
                 seed=0, name=None):
        _check(loss_type, advantage, beta, num_iterations, lm)
        super().__init__(name=name or f"rl_{lm.name}")
        self.lm = lm
        self.built = lm.built
        self.rewards, self.reward_weights = rewards, reward_weights
        if isinstance(rollout, dict):
            rollout = RolloutConfig(**rollout)
        self.rollout = rollout or RolloutConfig()
        self.loss_type, self.advantage = loss_type, advantage
        self.scale_rewards = (loss_type != "dr_grpo" if scale_rewards is None
                              else bool(scale_rewards))
        self.beta, self.epsilon = float(beta), float(epsilon)
        self.epsilon_high = None if epsilon_high is None else float(epsilon_high)
        self.num_iterations, self.seed = num_iterations, int(seed)
        self.samples_path = None  # a JSON-lines file the trainer appends to
        self._generators, self._scorer = {}, None
        self.anatomy = Anatomy(task="causal_lm", backbone=lm.backbone.name,
                               family=type(lm.backbone).__name__, logits=True)
        self.kl_tracker = keras.metrics.Mean(name="kl")
        self.clip_tracker = keras.metrics.Mean(name="clip_fraction")

    @property
    def backbone(self):
        return self.lm.backbone

    def generator(self, greedy=False):
        """The `RolloutGenerator` for training (or greedy evaluation)."""
        if greedy not in self._generators:
            config = self.rollout
            if greedy:
                config = RolloutConfig(**{**vars(config), "temperature": 0.0,
                                          "num_generations": 1})
            self._generators[greedy] = RolloutGenerator(self.lm, config, self.seed)
        return self._generators[greedy]

    # === Forward passes ===

    def call(self, inputs, training=None):
        """Next-token logits of `{"token_ids", "padding_mask"}`."""
        return self.lm({"token_ids": inputs["token_ids"],
                        "padding_mask": inputs["padding_mask"]},
                       training=training)

    def _logps(self, x, training=False):
        return token_logps(self(x, training=training), x["targets"],
                           self.rollout.temperature)

    def needs_logps(self):
        """Which log-probabilities a batch needs before its updates."""
        return {"old_logps": self.num_iterations > 1, "ref_logps": self.beta > 0}

    def score(self, x):
        """`{"old_logps", "ref_logps"}` (as `needs_logps` says) of a batch of
        rollouts (`token_ids`, `padding_mask`, `targets`): the sampling
        policy's per-token log-probabilities and the reference's (the
        adapters off), in one compiled pass without gradients."""
        if self._scorer is None:
            self._scorer = _Untracked(_Scorer(self.lm, self.needs_logps(),
                                              self.rollout.temperature))
        inputs = {k: x[k] for k in ("token_ids", "padding_mask", "targets")}
        return self._scorer.model.predict_on_batch(inputs)

    # === Loss ===

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        """The policy loss of a batch of rollouts (`x`: tokens, `targets`,
        `completion_mask`, `advantages`, and the log-probabilities
        `score` gave); updates `kl` and `clip_fraction`."""
        logps = token_logps(y_pred, x["targets"], self.rollout.temperature)
        old = x["old_logps"] if "old_logps" in x else ops.stop_gradient(logps)
        loss, stats = policy_loss(
            logps, old, x["advantages"], x["completion_mask"],
            x.get("ref_logps"), beta=self.beta, epsilon_low=self.epsilon,
            epsilon_high=self.epsilon_high, loss_type=self.loss_type,
            max_completion_length=self.rollout.max_new_tokens)
        self.kl_tracker.update_state(stats["kl"])
        self.clip_tracker.update_state(stats["clip_fraction"])
        for extra in self.losses:
            loss = loss + ops.cast(ops.sum(extra), loss.dtype)
        return loss

    def compile(self, optimizer="auto", loss="auto", metrics=None,
                weighted_metrics=None, **kwargs):
        """`keras.Model.compile`; the loss is the objective's.

        `optimizer="auto"`: Adam at 1e-5 with LoRA adapters, 1e-6 without.
        `loss`, `metrics` and `weighted_metrics` take only their defaults.
        """
        if isinstance(optimizer, str) and optimizer == "auto":
            optimizer = keras.optimizers.Adam(1e-5 if lora_layers(self.lm) else 1e-6)
        for key, value in (("loss", loss), ("metrics", metrics),
                           ("weighted_metrics", weighted_metrics)):
            if value not in (None, "auto") and not (
                    isinstance(value, (list, tuple, dict)) and not value):
                raise ValueError(
                    f"RLCausalLM computes its own loss ({self.loss_type!r}) and "
                    f"metrics; compile takes {key}='auto' or None. Received: "
                    f"{key}={value!r}")
        super().compile(optimizer=optimizer, **kwargs)

    # === Training ===

    def fit(self, x=None, y=None, epochs=1, initial_epoch=0, steps_per_epoch=None,
            callbacks=None, validation_data=None, verbose="auto", **kwargs):
        """Trains on prompts (`x`: a `kft.rl.PromptDataset` or a list of
        prompt records); `validation_data`: held-out prompts, whose greedy
        completions' rewards are reported with `val_` each epoch. Returns
        the `History`. Other `keras.Model.fit` arguments are ignored."""
        from kft.rl.trainer import fit_prompts

        return fit_prompts(self, x, epochs=epochs, initial_epoch=initial_epoch,
                           steps_per_epoch=steps_per_epoch, callbacks=callbacks,
                           validation_data=validation_data, verbose=verbose)

    # === Config ===

    def get_config(self):
        config = super().get_config()
        config.update(lm=keras.saving.serialize_keras_object(self.lm),
                      rollout=dict(vars(self.rollout)), loss_type=self.loss_type,
                      advantage=self.advantage, scale_rewards=self.scale_rewards,
                      beta=self.beta, epsilon=self.epsilon,
                      epsilon_high=self.epsilon_high,
                      num_iterations=self.num_iterations, seed=self.seed)
        return config

    @classmethod
    def from_config(cls, config):
        return lm_wrapper_from_config(cls, config)
