"""The SFT model: `SFTCausalLM` trains a keras-hub causal LM on SFT
batches (`kft.data.sft_dataset`), packed rows with a block-diagonal
causal mask included.
"""


import keras
from keras import ops

from kft.backbones.anatomy import Anatomy
from kft.backbones.packing import packing_spec
from kft.backbones.remat import remat_enabled
from kft.backbones.remat import set_remat
from kft.losses.causal_lm import causal_lm_loss_and_metrics

__all__ = ["SFTCausalLM", "block_causal_mask", "lm_wrapper_from_config",
           "packed_logits"]


def block_causal_mask(segment_ids):
    """`(B, L, L)` int32 mask: position i attends to j <= i of its segment.

    Padding (segment 0) attends only to padding, so no row is empty.
    """
    segment_ids = ops.convert_to_tensor(segment_ids, "int32")
    index = ops.arange(ops.shape(segment_ids)[1])
    causal = ops.expand_dims(
        ops.greater_equal(index[:, None], index[None, :]), 0)
    same = ops.equal(ops.expand_dims(segment_ids, 2),
                     ops.expand_dims(segment_ids, 1))
    return ops.cast(ops.logical_and(same, causal), "int32")


def packed_logits(lm, token_ids, segment_ids):
    """Logits of packed rows: each segment as if it were alone in its row.

    Runs `lm`'s backbone layer by layer with a block-diagonal causal mask,
    and position ids that restart at each segment where the backbone has
    learned position embeddings.
    """
    backbone = lm.backbone
    embeddings, norm = packing_spec(backbone)
    mask = block_causal_mask(segment_ids)
    positions = ops.sum(mask, axis=-1) - 1  # tokens before i in its segment
    x = embeddings(backbone, token_ids, positions)
    for layer in backbone.transformer_layers:
        x = layer(x, decoder_attention_mask=mask)
    x = getattr(backbone, norm)(x)
    return backbone.token_embedding(x, reverse=True)


@keras.saving.register_keras_serializable(package="kft")
class SFTCausalLM(keras.Model):
    """A keras-hub causal LM that trains on `sft_dataset` batches.

    It shares every weight with `lm` (train it, then `lm.generate`), takes
    token ids rather than strings (keras-hub's `CausalLM.fit` would run its
    preprocessor on them again), and runs packed rows (`segment_ids` in the
    inputs) with block-diagonal attention. Its `anatomy` is `lm`'s, so kft's
    freezing, LoRA and learning-rate tools find the backbone.

    Args:
        lm: a keras-hub `CausalLM`.
        remat: True to rematerialise `lm`'s transformer blocks in training
            (`kft.remat.set_remat`, on `lm` itself), False to turn it off,
            None (the default) to keep `lm` as it is (e.g. from
            `kft.build_causal_lm(remat=True)`). Saved in the config.
        **kwargs: for `keras.Model` (e.g. `name`).

    Example:

    ```python
    model = kft.sft.SFTCausalLM(lm)
    model.compile(optimizer=keras.optimizers.Adam(1e-4))
    model.fit(kft.data.sft_dataset(records, lm, packing=True), epochs=2)
    lm.generate("2 + 2 =")
    ```
    """

    def __init__(self, lm, remat=None, **kwargs):
        kwargs.setdefault("name", f"sft_{lm.name}")
        super().__init__(**kwargs)
        if remat is not None and bool(remat) != remat_enabled(lm):
            set_remat(lm, remat)
        self.lm = lm
        self.built = lm.built
        self.anatomy = Anatomy(task="causal_lm", backbone=lm.backbone.name,
                               family=type(lm.backbone).__name__, logits=True)

    @property
    def backbone(self):
        return self.lm.backbone

    @property
    def remat(self):
        """Whether `lm`'s transformer blocks are rematerialised in training."""
        return remat_enabled(self.lm)

    def call(self, inputs, training=None):
        if "segment_ids" in inputs:
            return packed_logits(self.lm, inputs["token_ids"],
                                 inputs["segment_ids"])
        return self.lm({"token_ids": inputs["token_ids"],
                        "padding_mask": inputs["padding_mask"]},
                       training=training)

    def compile(self, optimizer="auto", loss="auto", *, weighted_metrics="auto",
                train_metrics=False, **kwargs):
        """`keras.Model.compile` with SFT defaults for `"auto"`.

        `optimizer`: Adam(2e-5), as keras-hub's `CausalLM`; `loss`:
        `kft.losses.causal_lm.CausalLMLoss`, sparse cross-entropy on the logits
        (never cast to float32 as a whole), averaged over the weighted
        (completion) tokens; `weighted_metrics`: token accuracy.
        `train_metrics`: whether the compiled metrics also update in
        training steps; by default only `evaluate` (and validation)
        computes them: token accuracy is an argmax over the vocabulary of
        every token, each step, for a number the loss already tracks.
        """
        if isinstance(optimizer, str) and optimizer == "auto":
            optimizer = keras.optimizers.Adam(2e-5)
        default_loss, default_metrics = causal_lm_loss_and_metrics()
        if isinstance(loss, str) and loss == "auto":
            loss = default_loss
        if isinstance(weighted_metrics, str) and weighted_metrics == "auto":
            weighted_metrics = default_metrics
        self.train_metrics = bool(train_metrics)
        super().compile(optimizer=optimizer, loss=loss,
                        weighted_metrics=weighted_metrics, **kwargs)

    def train_step(self, *args, **kwargs):
        # Keras traces this once per train function: the flag holds while
        # `compute_metrics` is traced inside it.
        self._in_train_step = True
        try:
            return super().train_step(*args, **kwargs)
        finally:
            self._in_train_step = False

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """Keras' `compute_metrics`; in a training step without
        `train_metrics`, the loss alone (no compiled metric updates)."""
        if getattr(self, "train_metrics", True) or not getattr(
                self, "_in_train_step", False):
            return super().compute_metrics(x, y, y_pred, sample_weight)
        return self._metric_results(compiled=False)

    def get_metrics_result(self):
        # Compiled metrics that never updated (training steps only, so
        # far) are not built, and have no result yet.
        return self._metric_results()

    def _metric_results(self, compiled=True):
        results = {}
        for metric in self.metrics:
            # "compile_metrics": Keras' container of the compiled metrics.
            if metric.name == "compile_metrics" and not (compiled and metric.built):
                continue
            result = metric.result()
            results.update(result if isinstance(result, dict)
                           else {metric.name: result})
        return results

    def get_config(self):
        config = super().get_config()
        config["lm"] = keras.saving.serialize_keras_object(self.lm)
        config["remat"] = self.remat
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        lm = keras.saving.deserialize_keras_object(config.pop("lm"))
        return cls(lm, **config)


def lm_wrapper_from_config(cls, config):
    """`cls(lm, **config)` for a Keras model that wraps a causal LM and saves
    it under `"lm"` (`PreferenceCausalLM`, `RLCausalLM`); `Model`'s own
    `trainable` / `dtype` keys are dropped."""
    config = dict(config)
    for key in ("trainable", "dtype"):
        config.pop(key, None)
    return cls(keras.saving.deserialize_keras_object(config.pop("lm")), **config)
