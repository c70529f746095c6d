"""The causal-LM loss: cross-entropy that never holds float32 logits.

A causal LM's logits are `(batch, sequence, vocabulary)`: at SmolLM2's
49,152 tokens, sequence 512 and batch 8, 805 MB in float32. Keras'
`SparseCategoricalCrossentropy` casts them all to float32, keeps their
softmax for the backward pass and returns the gradient in float32.
`CausalLMLoss` computes the same numbers a chunk of the sequence at a
time: each chunk is cast to float32 for its log-sum-exp and dropped, the
backward pass (a custom gradient, `softmax - one_hot`) recomputes each
chunk's softmax from the logits and `log-sum-exp` alone and returns the
gradient in the logits' dtype. Under float32 it equals Keras' loss, and
its gradient, to float rounding.
"""

import keras
from keras import ops

__all__ = ["CausalLMLoss", "causal_lm_loss_and_metrics",
           "chunked_sparse_cross_entropy"]

# Sequence positions per chunk: at batch 8 and a 49,152-token vocabulary,
# 128 positions are 200 MB of float32 logits at a time.
DEFAULT_CHUNK = 128


def _spans(length, chunk):
    """`[(start, stop), ...]` covering `length` (one span if unknown)."""
    if length is None:
        return [(None, None)]
    return [(start, min(start + chunk, length)) for start in range(0, length, chunk)]


def _chunk_losses(logits, labels):
    """Per-token `log-sum-exp - picked logit` of one chunk (float32), and
    the log-sum-exp."""
    logits = ops.cast(logits, "float32")
    lse = ops.logsumexp(logits, axis=-1)
    picked = ops.take_along_axis(logits, ops.expand_dims(labels, -1), axis=-1)
    return lse - ops.squeeze(picked, -1), lse


def _chunk_gradient(logits, labels, lse, upstream):
    """`(softmax - one_hot) * upstream` of one chunk, in the logits' dtype."""
    probs = ops.exp(ops.cast(logits, "float32") - ops.expand_dims(lse, -1))
    hot = ops.one_hot(labels, ops.shape(logits)[-1], dtype="float32")
    grad = (probs - hot) * ops.expand_dims(upstream, -1)
    return ops.cast(grad, logits.dtype)


def _has_custom_gradient():
    return keras.backend.backend() in ("tensorflow", "jax")


def chunked_sparse_cross_entropy(y_true, logits, chunk_size=DEFAULT_CHUNK):
    """Per-token sparse cross-entropy from logits, a chunk at a time.

    Args:
        y_true: integer targets, the shape of `logits` without its last axis.
        logits: `(..., positions, vocabulary)` in any float dtype.
        chunk_size: positions (along the second-to-last axis) per chunk.

    Returns:
        float32 losses, the shape of `y_true`.

    Example:

    >>> logits = keras.ops.zeros((2, 3, 4))
    >>> losses = chunked_sparse_cross_entropy(keras.ops.zeros((2, 3), "int32"),
    ...                                       logits, chunk_size=2)
    >>> round(float(keras.ops.mean(losses)), 4)  # log(4)
    1.3863
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError("chunk_size must be a positive integer. Received: "
                         f"chunk_size={chunk_size!r}")
    logits = ops.convert_to_tensor(logits)
    labels = ops.cast(y_true, "int32")
    rank = len(logits.shape)
    spans = _spans(logits.shape[-2], chunk_size)

    def pieces(x, start, stop):
        return x[..., start:stop, :] if len(x.shape) == rank else x[..., start:stop]

    def forward(x):
        parts = [_chunk_losses(pieces(x, a, b), pieces(labels, a, b))
                 for a, b in spans]
        return [ops.concatenate(p, axis=-1) if len(spans) > 1 else p[0]
                for p in zip(*parts)]

    if not _has_custom_gradient():
        return forward(logits)[0]

    @ops.custom_gradient
    def nll(x):
        losses, lse = forward(x)

        def grad(*args, upstream=None):
            upstream = args[0] if upstream is None else upstream
            parts = [_chunk_gradient(pieces(x, a, b), pieces(labels, a, b),
                                     pieces(lse, a, b), pieces(upstream, a, b))
                     for a, b in spans]
            return ops.concatenate(parts, axis=-2) if len(parts) > 1 else parts[0]

        return losses, grad

    return nll(logits)


@keras.saving.register_keras_serializable(package="kft")
class CausalLMLoss(keras.losses.Loss):
    """Sparse cross-entropy from a causal LM's logits, without float32 logits.

    The same numbers as `keras.losses.SparseCategoricalCrossentropy(
    from_logits=True)` (see `chunked_sparse_cross_entropy`); the logits
    stay in their own dtype (Keras' losses cast them to float32 first).

    Args:
        chunk_size: sequence positions per float32 chunk.
        reduction: as `keras.losses.Loss`; default `"mean_with_sample_weight"`
            (SFT: the mean over the weighted, completion tokens).
        name: the loss's name.

    Example:

    ```python
    model = kft.sft.SFTCausalLM(lm)
    model.compile(optimizer="adam", loss=kft.losses.causal_lm.CausalLMLoss())
    ```
    """

    def __init__(self, chunk_size=DEFAULT_CHUNK, reduction="mean_with_sample_weight",
                 name="causal_lm_loss", **kwargs):
        super().__init__(name=name, reduction=reduction, **kwargs)
        self.chunk_size = chunk_size

    def __call__(self, y_true, y_pred, sample_weight=None):
        # `Loss.__call__` casts `y_pred` to float32: give it the per-token
        # losses (float32 already) instead of the logits.
        losses = chunked_sparse_cross_entropy(y_true, y_pred, self.chunk_size)
        return super().__call__(y_true, losses, sample_weight)

    def call(self, y_true, y_pred):
        return y_pred  # per-token losses, from `__call__`

    def get_config(self):
        return {**super().get_config(), "chunk_size": self.chunk_size}


def causal_lm_loss_and_metrics():
    """The loss and weighted metrics a causal LM compiles with by default:
    `CausalLMLoss` (mean over the weighted tokens) and token accuracy."""
    return CausalLMLoss(), [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]


def answer_logps(logits, targets, weights):
    """Summed log-probabilities of the weighted (answer) tokens, and their
    count.

    Args:
        logits: `(..., L, vocabulary)` in any float dtype (never cast to
            float32 as a whole: `chunked_sparse_cross_entropy`).
        targets: `(..., L)` the next tokens.
        weights: `(..., L)` 1 on the answer's tokens.

    Returns:
        `(logps, lengths)`, float32, of shape `(...)`.
    """
    weights = ops.cast(weights, "float32")
    nll = chunked_sparse_cross_entropy(targets, logits)
    return -ops.sum(nll * weights, axis=-1), ops.sum(weights, axis=-1)
