"""A LoRA projection as one matmul, with a gradient that forms no weight
gradient: what a Dense / EinsumDense LoRA layer runs in training.

Separately, a training step of `y = x @ W + x @ A @ B` reads `x` for the
base and again for the adapter, writes the base output, reads it back to
add the update, and in the backward pass likewise reads `dy` twice and
adds two input gradients. Here, with `W' = W + A @ B` formed per step
(weight-sized, `fan_in * r * fan_out` flops: `r / tokens` of the
projection's `tokens * fan_in * fan_out`, small in any training step):

- forward: `y = x @ W'`, one projection instead of two and an add;
  `x @ A` (`tokens * r`) is kept for the backward pass;
- backward: `dx = dy @ W'^T`, one matmul instead of two and an add; then
  `dA = x^T (dy @ B^T)` and `dB = (x @ A)^T dy`.

Concatenating `[W' | A]` into one forward matmul (and `[W' ; B]` in the
backward) was measured too: fewer matmuls, but slicing the joint output
copies an activation each time: 10% more bytes in all (XLA's count
at the SmolLM2 shape, `benchmarks/lora_cost.py`).

The frozen `W` gets no gradient (its cotangent is zeros, which XLA and
TensorFlow drop unused), so the step never forms the `(fan_in, fan_out)`
weight gradient that Keras' `enable_lora` (`x @ (W + A B)` by autodiff)
computes. Unsloth's fused LoRA kernels make the same trade. The numbers
are those of the separate form to rounding: `x @ (W + A B)` and `x @ W +
(x @ A) @ B` differ by one rounding of `W + A B` in the compute dtype.
"""

from keras import ops

__all__ = ["fused_lora_group", "fused_lora_matmul"]


def fused_lora_matmul(x, kernel, a, b):
    """`x @ (kernel + a @ b)`, with the gradients of `x`, `a` and `b` (not of
    `kernel`) computed as described in this module.

    Args:
        x: `(tokens, fan_in)`.
        kernel: the frozen `(fan_in, fan_out)` kernel, in `x`'s dtype.
        a: `(fan_in, r)`, in `x`'s dtype.
        b: `(r, fan_out)` (the scale folded in), in `x`'s dtype.

    Returns:
        `(tokens, fan_out)`.
    """
    @ops.custom_gradient
    def forward(x, kernel, a, b):
        merged = kernel + ops.matmul(a, b)
        y = ops.matmul(x, merged)
        xa = ops.matmul(x, a)

        def backward(*upstream, **unused):
            dy = upstream[0]
            # Formed again rather than kept from the forward pass: a copy of
            # every adapted kernel alive until the backward pass would cost
            # more memory than the small matmul costs time.
            merged = kernel + ops.matmul(a, b)
            dx = ops.matmul(dy, ops.transpose(merged))
            da = ops.matmul(ops.transpose(x), ops.matmul(dy, ops.transpose(b)))
            db = ops.matmul(ops.transpose(xa), dy)
            return dx, ops.zeros_like(kernel), da, db

        return y, backward

    return forward(x, kernel, a, b)


def fused_lora_group(x, kernels, a_parts, b_parts):
    """`[x @ (W_i + A_i B_i)]` for adapters that read one `x` (query, key
    and value; gate and up): each projection as `fused_lora_matmul`, and
    `x @ concat(A_i)` and the `A` gradients `x^T concat(dy_i B_i^T)` as one
    matmul each for the group.

    Args:
        x: `(tokens, fan_in)`.
        kernels, a_parts, b_parts: per member, as `fused_lora_matmul`'s.

    Returns:
        The members' outputs, a tuple of `(tokens, fan_out_i)`.
    """
    count = len(kernels)
    ranks = [int(a.shape[-1]) for a in a_parts]

    @ops.custom_gradient
    def forward(x, *weights):
        kernels, a_parts, b_parts = (weights[:count], weights[count:2 * count],
                                     weights[2 * count:])
        merged = [w + delta for w, delta in
                  zip(kernels, _products(a_parts, b_parts))]
        ys = tuple(ops.matmul(x, m) for m in merged)
        xa = _split(ops.matmul(x, ops.concatenate(a_parts, axis=-1)), ranks)

        def backward(*upstream, **unused):
            # TensorFlow passes one cotangent per output, JAX their tuple.
            dys = (upstream[0] if len(upstream) == 1
                   and isinstance(upstream[0], (tuple, list)) else upstream)
            merged = [w + delta for w, delta in
                      zip(kernels, _products(a_parts, b_parts))]
            dx = ops.matmul(dys[0], ops.transpose(merged[0]))
            for dy, m in zip(dys[1:], merged[1:]):
                dx = dx + ops.matmul(dy, ops.transpose(m))
            dybs = [ops.matmul(dy, ops.transpose(b))
                    for dy, b in zip(dys, b_parts)]
            da = _split(ops.matmul(ops.transpose(x),
                                   ops.concatenate(dybs, axis=-1)), ranks)
            db = [ops.matmul(ops.transpose(p), dy) for p, dy in zip(xa, dys)]
            return (dx, *[ops.zeros_like(w) for w in kernels], *da, *db)

        return ys, backward

    return forward(x, *kernels, *a_parts, *b_parts)


def _products(a_parts, b_parts):
    """`[A_i @ B_i]`, consecutive members of one shape as one batched
    matmul (key and value under grouped-query attention; gate and up)."""
    products, start = [], 0
    while start < len(a_parts):
        end = start + 1
        while end < len(a_parts) and (
                tuple(a_parts[end].shape), tuple(b_parts[end].shape)) == (
                tuple(a_parts[start].shape), tuple(b_parts[start].shape)):
            end += 1
        if end - start == 1:
            products.append(ops.matmul(a_parts[start], b_parts[start]))
        else:
            stacked = ops.matmul(ops.stack(a_parts[start:end]),
                                 ops.stack(b_parts[start:end]))
            products.extend(stacked[i] for i in range(end - start))
        start = end
    return products


def _split(joint, sizes):
    """`joint`'s last axis cut into parts of `sizes`."""
    if len(sizes) == 1:
        return [joint]
    offsets, total = [], 0
    for size in sizes[:-1]:
        total += size
        offsets.append(total)
    return ops.split(joint, offsets, axis=-1)
