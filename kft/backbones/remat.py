"""Rematerialisation (gradient checkpointing) of a transformer's blocks.

`set_remat(lm)` makes each transformer block of a keras-hub backbone keep
only its input for the backward pass and run its forward pass again there
(`keras.remat`: `jax.checkpoint` on JAX, `tf.recompute_grad` on
TensorFlow), so the activations held between the forward and backward
passes shrink from every block's intermediates (attention projections,
scores, the MLP's wide hidden layer) to one `(batch, sequence, hidden)`
tensor per block, at the cost of a second forward pass of the blocks.

Keras' own `keras.RematScope(mode="list_of_layers")` has to be open while
the layers are constructed (inside `from_preset`), and passes the block's
`training` flag and masks to `jax.checkpoint` as traced arrays, which the
blocks' Python `if training:` refuses. Here the block's floating-point
tensors are the checkpointed inputs and everything else (flags, masks,
`None`) is held fixed, on a model that already exists; only training calls
are rematerialised (generation runs the plain blocks). The checkpointed
function calls the block through `Layer.__call__` with the same
`training` flag: TensorFlow recomputes in the backward pass, outside the
forward pass's call context, where the block's sublayers would otherwise
see `training=None` (no dropout).

Dropout inside a block draws the same mask in the recomputation as in the
forward pass: the block's seed states are reset to their values at its
start, and the advanced states are set after it.
"""

import functools

import keras

__all__ = ["remat_enabled", "set_remat", "transformer_blocks"]

# Set on the function that replaces a block's `call`: the original method.
_ORIGINAL = "kft_remat_original"


def transformer_blocks(model):
    """The transformer layers of a keras-hub backbone, in order.

    Args:
        model: a keras-hub `CausalLM` or `Backbone`, or a kft model that
            wraps one (`kft.sft.SFTCausalLM`, which has a `backbone`).

    Returns:
        The list of the backbone's `transformer_layers`.
    """
    backbone = getattr(model, "backbone", model)
    blocks = getattr(backbone, "transformer_layers", None)
    if not blocks:
        raise ValueError(
            "remat works on the transformer layers of a keras-hub backbone "
            "(its `transformer_layers`), and this model has none. Received: "
            f"{type(model).__name__} with backbone {type(backbone).__name__}")
    return list(blocks)


def set_remat(model, enabled=True):
    """Recomputes each transformer block's activations in the backward pass.

    Trades compute for memory: a training step then holds one activation
    per block (its input) instead of all of the block's intermediates, and
    runs the blocks' forward pass twice (about a third more flops for the
    step). Calls with `training` false (evaluation, generation) are not
    affected. Works in place, on a model already built, loaded or adapted
    (LoRA, quantized); `set_remat(model, False)` undoes it.

    Args:
        model: a keras-hub `CausalLM` or `Backbone` (or a kft model with a
            `backbone`, e.g. `kft.sft.SFTCausalLM`).
        enabled: True to rematerialise, False to return to the plain blocks.

    Returns:
        The number of transformer blocks.

    Example:

    ```python
    lm = kft.build_causal_lm("smollm2", sequence_length=4096)
    kft.remat.set_remat(lm)
    model = kft.sft.SFTCausalLM(lm)
    ```
    """
    blocks = transformer_blocks(model)
    for block in blocks:
        original = getattr(block.call, _ORIGINAL, None)
        if enabled and original is None:
            block.call = _remat_call(block.call)
        elif not enabled and original is not None:
            block.call = original
    return len(blocks)


def remat_enabled(model):
    """Whether `set_remat` rematerialises `model`'s transformer blocks."""
    try:
        blocks = transformer_blocks(model)
    except ValueError:
        return False
    return all(hasattr(block.call, _ORIGINAL) for block in blocks)


def _remat_call(call):
    layer = call.__self__
    inside = []  # not empty while the checkpointed block runs the layer

    @functools.wraps(call)
    def remat_call(*args, **kwargs):
        if inside or not kwargs.get("training"):
            return call(*args, **kwargs)
        return _checkpointed(layer, inside, args, kwargs)

    setattr(remat_call, _ORIGINAL, call)
    return remat_call


def _is_float_tensor(value):
    return keras.ops.is_tensor(value) and keras.backend.is_float_dtype(
        keras.backend.standardize_dtype(value.dtype))


def _seed_states(layer):
    # SeedGenerator states (dropout): the only variables a transformer
    # block assigns in a forward pass.
    return [v for v in layer.non_trainable_variables
            if v.path.endswith("seed_generator_state")]


def _checkpointed(layer, inside, args, kwargs):
    """`layer(*args, **kwargs)` under `keras.remat`, over its float tensors
    (`inside` makes the layer's own `call` run plainly within)."""
    seeds = _seed_states(layer)
    # Copies: on TensorFlow `value` is the variable itself, not a snapshot.
    start = [keras.ops.copy(seed.value) for seed in seeds]
    leaves = keras.tree.flatten((args, kwargs))
    positions = [i for i, leaf in enumerate(leaves) if _is_float_tensor(leaf)]

    def block(*tensors):
        # A recomputation replays the forward pass's dropout masks.
        for seed, value in zip(seeds, start):
            seed.assign(value)
        filled = list(leaves)
        for i, tensor in zip(positions, tensors):
            filled[i] = tensor
        block_args, block_kwargs = keras.tree.pack_sequence_as(
            (args, kwargs), filled)
        inside.append(True)
        try:
            outputs = layer(*block_args, **block_kwargs)
        finally:
            inside.pop()
        return outputs, [keras.ops.copy(seed.value) for seed in seeds]

    outputs, states = keras.remat(block)(*[leaves[i] for i in positions])
    # Inside `jax.checkpoint` the seed updates are the block's own values;
    # these are the ones the rest of the step sees.
    for seed, value in zip(seeds, states):
        seed.assign(value)
    return outputs
