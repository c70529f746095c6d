"""Prompt tuning: trainable virtual tokens for a frozen keras-hub backbone.

Lester et al. (2021): the backbone stays frozen; a few "virtual token"
embeddings, inserted after the first ([CLS]) token, are all that trains.
"""

import keras
from keras import ops

from kft._keras_internals import set_trainable_flag

__all__ = ["PromptTuning", "prompt_tune"]


def _insert_after_first(sequence, values):
    """`sequence[:, :1] + values + sequence[:, 1:]` along axis 1."""
    return ops.concatenate([sequence[:, :1], values, sequence[:, 1:]], axis=1)


@keras.saving.register_keras_serializable(package="kft")
class PromptTuning(keras.layers.Layer):
    """Inserts `num_virtual_tokens` trainable embeddings after position 0.

    Call it on token embeddings `(batch, length, hidden)`; it returns
    `(batch, length + num_virtual_tokens, hidden)`.

    Args:
        num_virtual_tokens: how many virtual tokens.
        initializer: initializer of the embeddings (random normal 0.02 by
            default; `prompt_tune(init_token_ids=...)` starts them from
            real token embeddings instead).
    """

    def __init__(self, num_virtual_tokens=20, initializer=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
            raise ValueError(
                "num_virtual_tokens must be an integer >= 1. Received: "
                f"{num_virtual_tokens!r}")
        self.num_virtual_tokens = num_virtual_tokens
        self.initializer = keras.initializers.get(
            initializer or keras.initializers.RandomNormal(stddev=0.02))

    def build(self, input_shape):
        self.prompt = self.add_weight(
            name="prompt", shape=(self.num_virtual_tokens, input_shape[-1]),
            initializer=self.initializer)

    def call(self, embeddings):
        batch = ops.shape(embeddings)[0]
        prompt = ops.broadcast_to(
            ops.cast(self.prompt, embeddings.dtype)[None],
            (batch, self.num_virtual_tokens, ops.shape(embeddings)[-1]))
        return _insert_after_first(embeddings, prompt)

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_virtual_tokens": self.num_virtual_tokens,
            "initializer": keras.initializers.serialize(self.initializer),
        })
        return config


@keras.saving.register_keras_serializable(package="kft")
class _InsertIds(keras.layers.Layer):
    """Inserts `fill` after position 0 of `(batch, length)` ids or masks,
    so segments and the padding mask line up with the virtual tokens."""

    def __init__(self, num_virtual_tokens, fill, **kwargs):
        super().__init__(**kwargs)
        self.num_virtual_tokens, self.fill = num_virtual_tokens, fill

    def call(self, ids):
        batch = ops.shape(ids)[0]
        pad = ops.full((batch, self.num_virtual_tokens), self.fill, dtype=ids.dtype)
        return _insert_after_first(ids, pad)

    def get_config(self):
        return {**super().get_config(), "num_virtual_tokens":
                self.num_virtual_tokens, "fill": self.fill}


def prompt_tune(backbone, num_virtual_tokens=20, init_token_ids=None):
    """A prompt-tuned version of a BERT-family keras-hub backbone.

    Returns a functional model with the backbone's inputs and outputs
    (`sequence_output` gains the virtual positions, `pooled_output` still
    reads [CLS]), the backbone's layers frozen and only the virtual tokens
    trainable. The padding mask and segment ids are extended for them.

    Args:
        backbone: a `keras_hub.models.BertBackbone` (or one with the same
            embedding layers: `token_embedding`, `position_embedding`,
            `segment_embedding`, `transformer_layers`, `pooled_dense`).
        num_virtual_tokens: how many virtual tokens.
        init_token_ids: start the virtual tokens from these tokens'
            embeddings (e.g. the tokenized words of a task description),
            repeated to `num_virtual_tokens`.
    """
    needed = ("token_embedding", "position_embedding", "segment_embedding",
              "embeddings_layer_norm", "transformer_layers", "pooled_dense")
    missing = [n for n in needed if not hasattr(backbone, n)]
    if missing:
        raise ValueError(
            f"prompt_tune supports BERT-family keras-hub backbones; "
            f"{type(backbone).__name__} lacks {missing}.")
    max_length = backbone.position_embedding.sequence_length
    set_trainable_flag(backbone, False)
    initializer = None
    if init_token_ids is not None:
        table = ops.convert_to_numpy(backbone.token_embedding.embeddings)
        ids = [init_token_ids[i % len(init_token_ids)]
               for i in range(num_virtual_tokens)]
        initializer = keras.initializers.Constant(table[ids])
    prompt = PromptTuning(num_virtual_tokens, initializer, name="prompt_tuning")

    # === Functional Model ===
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    segment_ids = keras.Input((None,), dtype="int32", name="segment_ids")
    padding_mask = keras.Input((None,), dtype="int32", name="padding_mask")
    tokens = prompt(backbone.token_embedding(token_ids))
    positions = backbone.position_embedding(tokens)
    segments = backbone.segment_embedding(
        _InsertIds(num_virtual_tokens, 0, name="prompt_segments")(segment_ids))
    mask = _InsertIds(num_virtual_tokens, 1, name="prompt_mask")(padding_mask)
    x = backbone.embeddings_add((tokens, positions, segments))
    x = backbone.embeddings_layer_norm(x)
    x = backbone.embeddings_dropout(x)
    for layer in backbone.transformer_layers:
        x = layer(x, padding_mask=mask)
    pooled = backbone.pooled_dense(x[:, 0, :])
    model = keras.Model(
        {"token_ids": token_ids, "segment_ids": segment_ids,
         "padding_mask": padding_mask},
        {"sequence_output": x, "pooled_output": pooled},
        name=f"{backbone.name}_prompt_tuned")
    model.max_text_length = max_length - num_virtual_tokens
    return model


def prompt_tune_classifier(classifier, num_virtual_tokens=20, init_text=None,
                           **kwargs):
    """The same keras-hub classifier class around a prompt-tuned backbone.

    The backbone (BERT family) is rebuilt by `kft.prompt.prompt_tune` and
    frozen; a new classification head and the virtual tokens train. The
    preprocessor is shared; its sequence length shrinks when the backbone's
    position table has no room left for the virtual tokens.

    Args:
        classifier: a keras-hub text classifier (`build_text_classifier`).
        num_virtual_tokens: how many virtual tokens.
        init_text: start them from this text's token embeddings.
        **kwargs: for the classifier class (e.g. `dropout`).
    """
    preprocessor = classifier.preprocessor
    init_ids = None
    if init_text:
        init_ids = [int(i) for i in preprocessor.tokenizer(init_text)] or None
    prompted = prompt_tune(classifier.backbone, num_virtual_tokens,
                           init_token_ids=init_ids)
    preprocessor.sequence_length = min(preprocessor.sequence_length,
                                       prompted.max_text_length)
    return type(classifier)(backbone=prompted,
                            num_classes=classifier.num_classes,
                            preprocessor=preprocessor, **kwargs)
