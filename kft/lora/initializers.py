"""How LoRA adapters start: PEFT's `init_lora_weights`, in kft's layout.

kft's adapters are `lora_a` `(fan_in, r)` and `lora_b` `(r, fan_out)` on
the kernel flattened to `(fan_in, fan_out)` (the transpose of PEFT's
`lora_A.weight` `(r, in)` and `lora_B.weight` `(out, r)`); the update is
`scale * A @ B`. The initialisations, by PEFT's names:

- `"default"` (PEFT's `True`): `A` random, `B` zero, so a fresh adapter
  changes nothing. kft draws `A` He-uniform (`U(+-sqrt(6 / fan_in))`);
  PEFT's `kaiming_uniform_(a=sqrt(5))` is `U(+-1 / sqrt(fan_in))`, the
  same shape, 2.4 times narrower. Embeddings, as PEFT: `A` zero, `B`
  standard normal.
- `"gaussian"`: `A ~ N(0, 1 / r)` (PEFT: `std=1 / r`), `B` zero.
  Embeddings: as `"default"` (PEFT ignores it there too).
- `"pissa"` (Meng et al. 2024): `A`, `B` from the top-`r` singular
  triplets of `W = U S V^T`, `A = U_r sqrt(S_r / scale)`, `B = sqrt(S_r /
  scale) V_r^T`, and the frozen kernel becomes the residual `W - scale *
  A @ B`, so the layer's outputs are unchanged at step 0.
- `"olora"` (Buyukakyuz 2024): `Q R = W^T` (PEFT's QR of its `(out, in)`
  weight), `A = R_r^T`, `B = Q_r^T` (no division by `scale`, as PEFT), and
  the kernel becomes `W - scale * A @ B`.

PiSSA and OLoRA change the base kernel. A kft layer keeps the starting
`A0`, `B0` (non-trainable `lora_a_init`, `lora_b_init`), so that
`plain_lora_weights` can express the trained adapter as a plain LoRA
adapter for the original base, exactly: `W_res + s A B = W + s (A B - A0
B0) = W + s [A | A0] [B ; -B0]`, rank `2 r` (PEFT's
`path_initial_model_for_weight_conversion`).
"""

import math

import keras
import numpy as np

__all__ = ["INITS", "KERNEL_INITS", "olora_factors", "pissa_factors",
           "plain_lora_weights"]

INITS = ("default", "gaussian", "pissa", "olora")
# The initialisations that rewrite the frozen kernel (to its residual).
KERNEL_INITS = ("pissa", "olora")


def check_init(init):
    """Refuses an unknown initialisation, naming the allowed ones."""
    if init not in INITS:
        raise ValueError(
            f"init must be one of {INITS} (PEFT's init_lora_weights True, "
            f"'gaussian', 'pissa', 'olora'). Received: init={init!r}")
    return init


def _check_rank(flat, rank, init):
    if rank > min(flat.shape):
        raise ValueError(
            f"init={init!r} takes the top-r factors of the {flat.shape[0]} x "
            f"{flat.shape[1]} kernel, so rank must be <= {min(flat.shape)}. "
            f"Received: rank={rank}")


# Both factorisations run in float32 through `keras.ops` (as PEFT runs
# them in float32 through torch): the backend's SVD / QR, which with
# TensorFlow loaded is 10 to 30 times faster than NumPy's on a busy CPU.


def pissa_factors(flat, rank, scale):
    """PiSSA's `(A, B)`: `scale * A @ B` is the best rank-`rank`
    approximation of `flat` (`(fan_in, fan_out)`), split evenly."""
    _check_rank(flat, rank, "pissa")
    u, s, vt = (np.asarray(t) for t in keras.ops.svd(
        np.asarray(flat, "float32"), full_matrices=False))
    root = np.sqrt(s[:rank] / scale)
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def olora_factors(flat, rank):
    """OLoRA's `(A, B)`: from the QR decomposition of the `(fan_out,
    fan_in)` weight, as PEFT's `olora_init`."""
    _check_rank(flat, rank, "olora")
    q, r = (np.asarray(t) for t in keras.ops.qr(
        np.asarray(flat, "float32").T, mode="reduced"))
    return r[:rank].T, q[:, :rank].T


def plain_lora_weights(layer):
    """`(lora_a, lora_b, rank, alpha)` of a plain LoRA adapter for the
    layer's original base kernel.

    A `"default"` / `"gaussian"` adapter is returned as it is. A
    `"pissa"` / `"olora"` adapter trained on the residual kernel becomes
    the rank-`2 r` adapter `[A | A0]`, `[B ; -B0]` with the same scale
    (`alpha` rescaled for the new rank), exact to float rounding (PEFT's
    conversion).
    """
    a, b = np.asarray(layer.lora_a), np.asarray(layer.trained_value("lora_b"))
    if layer.init not in KERNEL_INITS:
        return a, b, layer.adapter_rank, layer.alpha
    rank = 2 * layer.adapter_rank
    alpha = layer.scale * (math.sqrt(rank) if layer.use_rslora else rank)
    a = np.concatenate([a, np.asarray(layer.lora_a_init)], axis=1)
    b = np.concatenate([b, -np.asarray(layer.lora_b_init)], axis=0)
    return a, b, rank, alpha
