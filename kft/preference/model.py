"""Preference tuning of a causal LM (DPO and its family) as a Keras model.

`PreferenceCausalLM(lm, loss="dpo")` trains on `preference_dataset`
batches with `fit`. It shares every weight with `lm` (train it, then
`lm.generate`), scores the chosen and the rejected answers of a batch in
one forward pass (`(2 * batch, length)` tokens), and compares them with a
reference model in one of three ways:

- `"adapters_off"` (with LoRA / QLoRA): the same model with its adapters
  switched off for the reference pass (`kft.lora.adapters_disabled`, read
  when the step is traced: that pass has no adapter work, and nothing
  retraces). One set of weights in memory; a second forward pass, without
  gradients, each step.
- `"precomputed"`: the reference log-probabilities computed once over the
  data (`preference_dataset(..., reference=lm)`, optionally cached on
  disk), read from each batch: no reference pass during training at all
  (TRL's `precompute_ref_log_probs`). For full fine-tuning.
- `"copy"`: a frozen copy of `lm`'s weights made when the model is built: a
  second model in memory and a second forward pass each step (what TRL
  does by default). For full fine-tuning when the data changes.

Reference-free losses (`simpo`, `orpo`) need none. The losses are in
`kft.losses.preference`.

Metrics, per epoch and with `val_` on validation data, as TRL reports them
(with `_` for `/`): `rewards_chosen`, `rewards_rejected`,
`reward_accuracy` (the share of pairs whose chosen reward is the larger; a
tie counts one half, so an untrained LoRA policy, whose rewards are all 0,
scores 0.5), `reward_margin` (mean chosen minus mean rejected reward),
`logps_chosen`, `logps_rejected` (summed answer log-probabilities) and,
for KTO, `kl`.
"""

import inspect

import keras
import numpy as np
from keras import ops

from kft.backbones.anatomy import Anatomy
from kft.lora.adapters import adapters_disabled
from kft.lora.base import lora_layers
from kft.losses.causal_lm import answer_logps
from kft.losses.preference import LOSSES
from kft.sft.model import lm_wrapper_from_config

__all__ = ["REFERENCES", "PreferenceCausalLM", "copy_causal_lm"]

REFERENCES = ("adapters_off", "precomputed", "copy")


def copy_causal_lm(lm):
    """A frozen copy of a keras-hub `CausalLM`'s backbone and weights
    (without preprocessor), for `reference="copy"`."""
    backbone = lm.backbone
    config = backbone.get_config()
    # keras-hub 0.32 leaves some constructor arguments out of get_config
    # (a tied Llama 3's tie_word_embeddings): take them from the backbone.
    for name in inspect.signature(type(backbone).__init__).parameters:
        if name not in config and name not in ("self", "kwargs") and hasattr(
                backbone, name):
            config[name] = getattr(backbone, name)
    try:
        twin = type(backbone).from_config(config)
        twin.set_weights([np.asarray(w) for w in backbone.get_weights()])
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"reference='copy' could not copy this {type(backbone).__name__} "
            f"({error}). Use reference='precomputed' (log-probabilities "
            "computed once: preference_dataset(..., reference=lm)).") from None
    reference = type(lm)(backbone=twin, preprocessor=None)
    reference.trainable = False
    return reference


class _Untracked:
    """Holds the reference copy out of Keras' tracking: its weights are not
    the model's (never trained, saved or counted as the model's own)."""

    def __init__(self, model):
        self.model = model


class _RewardMargin(keras.metrics.Metric):
    """Mean chosen reward minus mean rejected reward over the epoch
    (paired: the mean per-pair margin; unpaired: the two means' gap)."""

    def __init__(self, name="reward_margin", **kwargs):
        super().__init__(name=name, **kwargs)
        self.sums = [self.add_variable(shape=(), initializer="zeros",
                                       name=f"{part}_{kind}")
                     for part in ("chosen", "rejected") for kind in ("sum", "n")]

    def update_state(self, chosen, rejected, chosen_weight=None,
                     rejected_weight=None):
        for (total, count), values, weight in (
                (self.sums[:2], chosen, chosen_weight),
                (self.sums[2:], rejected, rejected_weight)):
            weight = ops.ones_like(values) if weight is None else weight
            total.assign_add(ops.sum(values * weight))
            count.assign_add(ops.sum(weight))

    def result(self):
        chosen_sum, chosen_n, rejected_sum, rejected_n = (
            ops.cast(variable, self.dtype) for variable in self.sums)
        return (ops.divide_no_nan(chosen_sum, chosen_n)
                - ops.divide_no_nan(rejected_sum, rejected_n))

    def reset_state(self):
        for variable in self.sums:
            variable.assign(0.0)


def _check_arguments(loss, reference, options):
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {tuple(LOSSES)}. Received: "
                         f"loss={loss!r}")
    spec = LOSSES[loss]
    if spec.reference and reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}. Received: "
                         f"reference={reference!r}")
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(f"loss={loss!r} takes the options {list(spec.options)} "
                         f"besides beta. Received: {unknown}")
    return spec


@keras.saving.register_keras_serializable(package="kft")
class PreferenceCausalLM(keras.Model):
    """A keras-hub causal LM that trains on preference pairs with `fit`.

    Args:
        lm: a keras-hub `CausalLM` (LoRA applied first, for
            `reference="adapters_off"`).
        loss: one of `kft.losses.preference.LOSSES`: `"dpo"`, `"robust"`,
            `"ipo"`, `"hinge"` (with a reference), `"simpo"`, `"orpo"`
            (reference-free), `"kto"` (unpaired data).
        beta: the loss's `beta` (SimPO's reward scale, ORPO's `lambda`);
            default the paper's (2.0 for SimPO, 0.1 for the others).
        reference: `"adapters_off"`, `"precomputed"` or `"copy"` (module
            docstring); ignored by reference-free losses.
        **options: the loss's own options: `label_smoothing` (`dpo`: cDPO,
            `robust`), `gamma` (`simpo`), `desirable_weight`,
            `undesirable_weight` (`kto`); and `keras.Model`'s `name`.

    Example:

    ```python
    kft.lora.apply_lora(lm, targets="all-linear", rank=8)
    model = kft.preference.PreferenceCausalLM(lm, loss="dpo", beta=0.1)
    model.compile(optimizer=keras.optimizers.Adam(5e-5))
    history = model.fit(kft.data.preference_dataset(pairs, lm), epochs=2)
    history.history["reward_accuracy"]
    ```
    """

    computes_own_loss = True  # `kft.fine_tune` compiles it with loss="auto"

    def __init__(self, lm, loss="dpo", beta=None, reference="adapters_off",
                 **options):
        name = options.pop("name", f"preference_{lm.name}")
        spec = _check_arguments(loss, reference, options)
        super().__init__(name=name)
        self.lm = lm
        self.built = lm.built
        self.loss_name, self.spec, self.options = loss, spec, dict(options)
        self.beta = float(spec.beta if beta is None else beta)
        self.reference = reference if spec.reference else None
        if self.reference == "adapters_off" and not lora_layers(lm):
            raise ValueError(
                "reference='adapters_off' compares with the model's LoRA "
                "adapters switched off, and this model has none. Apply LoRA "
                "first (kft.lora.apply_lora), or use reference='precomputed' "
                "(preference_dataset(..., reference=lm)) or 'copy' for full "
                "fine-tuning.")
        self._copy = None
        if self.reference == "copy":
            if lora_layers(lm):
                raise ValueError("reference='copy' is for full fine-tuning; "
                                 "with LoRA use reference='adapters_off' (no "
                                 "second copy of the weights).")
            self._copy = _Untracked(copy_causal_lm(lm))
        self.anatomy = Anatomy(task="causal_lm", backbone=lm.backbone.name,
                               family=type(lm.backbone).__name__, logits=True)
        self._build_metrics()

    @property
    def backbone(self):
        return self.lm.backbone

    def _build_metrics(self):
        mean = keras.metrics.Mean
        self.reward_trackers = [mean(name="rewards_chosen"),
                                mean(name="rewards_rejected"),
                                mean(name="reward_accuracy"), _RewardMargin(),
                                mean(name="logps_chosen"),
                                mean(name="logps_rejected")]
        if self.spec.unpaired:
            self.reward_trackers.append(mean(name="kl"))

    # === Forward passes ===

    def _logits(self, lm, inputs, training):
        shape = ops.shape(inputs["token_ids"])
        flat = {key: ops.reshape(inputs[key], (-1, shape[-1]))
                for key in ("token_ids", "padding_mask")}
        logits = lm(flat, training=training)
        return ops.reshape(logits, (*shape, ops.shape(logits)[-1]))

    def call(self, inputs, training=None):
        """Logits `(B, 2, L, vocabulary)` of both sequences of each pair,
        in one pass over `(2 B, L)` tokens."""
        return self._logits(self.lm, inputs, training)

    def _reference_logps(self, x, y, sample_weight):
        if self.reference == "precomputed":
            if "reference_logps" not in x:
                raise ValueError(
                    "reference='precomputed' reads x['reference_logps'], and "
                    "these batches have none: build them with "
                    "kft.data.preference_dataset(..., reference=lm).")
            return ops.cast(x["reference_logps"], "float32")
        if self.reference == "copy":
            logits = self._logits(self._copy.model, x, False)
        else:
            # The same weights, traced without the adapters' work: nothing
            # retraces, and the pass costs the base alone.
            with adapters_disabled(self.lm):
                logits = self._logits(self.lm, x, False)
        return ops.stop_gradient(answer_logps(logits, y, sample_weight)[0])

    # === Loss and metrics ===

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        """The preference loss of the batch (mean over examples); updates
        the reward metrics."""
        _check_batch(self.loss_name, self.spec, x)
        logps, lengths = answer_logps(y_pred, y, sample_weight)
        reference = (self._reference_logps(x, y, sample_weight)
                     if self.spec.reference else None)
        if self.spec.unpaired:
            losses = self._unpaired_losses(logps, reference, x)
        else:
            losses = self._paired_losses(logps, lengths, reference)
        loss = ops.mean(losses)
        for extra in self.losses:
            loss = loss + ops.cast(ops.sum(extra), loss.dtype)
        return loss

    def _kwargs(self):
        return {"beta": self.beta, **self.options}

    def _paired_losses(self, logps, lengths, reference):
        if reference is None:
            losses = self.spec.function(logps, lengths, **self._kwargs())
            rewards = self.beta * logps / ops.maximum(lengths, 1.0)
        else:
            losses = self.spec.function(logps, reference, **self._kwargs())
            rewards = self.beta * (logps - reference)
        rewards = ops.stop_gradient(rewards)
        chosen, rejected = rewards[:, 0], rewards[:, 1]
        (rewards_chosen, rewards_rejected, accuracy, margin, logps_chosen,
         logps_rejected) = self.reward_trackers
        rewards_chosen.update_state(chosen)
        rewards_rejected.update_state(rejected)
        accuracy.update_state(_wins(chosen - rejected))
        margin.update_state(chosen, rejected)
        logps = ops.stop_gradient(logps)
        logps_chosen.update_state(logps[:, 0])
        logps_rejected.update_state(logps[:, 1])
        return losses

    def _unpaired_losses(self, logps, reference, x):
        """KTO: row 0 the example, row 1 its prompt with another example's
        completion (the KL estimate's sample)."""
        desirable = ops.cast(x["label"], "float32")
        kl = ops.stop_gradient(ops.maximum(
            ops.mean(logps[:, 1] - reference[:, 1]), 0.0))
        losses = self.spec.function(logps[:, 0], reference[:, 0], desirable, kl,
                                    **self._kwargs())
        rewards = ops.stop_gradient(self.beta * (logps[:, 0] - reference[:, 0]))
        undesirable = 1.0 - desirable
        (rewards_chosen, rewards_rejected, accuracy, margin, logps_chosen,
         logps_rejected, kl_tracker) = self.reward_trackers
        rewards_chosen.update_state(rewards, sample_weight=desirable)
        rewards_rejected.update_state(rewards, sample_weight=undesirable)
        # A desirable answer's reward should be positive, an undesirable's
        # negative.
        accuracy.update_state(_wins(rewards * (2.0 * desirable - 1.0)))
        margin.update_state(rewards, rewards, desirable, undesirable)
        logps = ops.stop_gradient(logps[:, 0])
        logps_chosen.update_state(logps, sample_weight=desirable)
        logps_rejected.update_state(logps, sample_weight=undesirable)
        kl_tracker.update_state(kl)
        return losses

    def compile(self, optimizer="auto", loss="auto", metrics=None,
                weighted_metrics=None, **kwargs):
        """`keras.Model.compile`; the loss is the constructor's.

        `optimizer="auto"`: Adam at 5e-5 when LoRA adapters train, 1e-6
        (TRL's `DPOConfig` default) when every weight does. `loss`,
        `metrics` and `weighted_metrics` take only their defaults
        (`"auto"` / `None`): the model computes its own loss and reward
        metrics.
        """
        if isinstance(optimizer, str) and optimizer == "auto":
            rate = 5e-5 if lora_layers(self.lm) else 1e-6
            optimizer = keras.optimizers.Adam(rate)
        for key, value in (("loss", loss), ("metrics", metrics),
                           ("weighted_metrics", weighted_metrics)):
            if value not in (None, "auto") and not (
                    isinstance(value, (list, tuple, dict)) and not value):
                raise ValueError(
                    f"PreferenceCausalLM computes its own loss ({self.loss_name!r}, "
                    "given to the constructor) and reward metrics; compile "
                    f"takes {key}='auto' or None. Received: {key}={value!r}")
        super().compile(optimizer=optimizer, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update(lm=keras.saving.serialize_keras_object(self.lm),
                      loss=self.loss_name, beta=self.beta,
                      reference=self.reference or "adapters_off", **self.options)
        return config

    @classmethod
    def from_config(cls, config):
        return lm_wrapper_from_config(cls, config)


def _check_batch(loss, spec, x):
    if spec.unpaired and "label" not in x:
        raise ValueError(f"loss={loss!r} trains on unpaired, labelled data: "
                         "build the batches with kft.data.preference_dataset("
                         "..., format='unpaired').")
    if not spec.unpaired and "label" in x:
        raise ValueError(f"loss={loss!r} trains on pairs, and these batches "
                         "are unpaired (format='unpaired' is for loss='kto').")


def _wins(margin):
    """1 where `margin > 0`, 1/2 on a tie, 0 below."""
    return ops.where(margin > 0, 1.0, ops.where(margin < 0, 0.0, 0.5))
