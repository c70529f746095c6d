"""Adapters that read one input, computed as one matmul.

Query, key and value of a self-attention layer read the same hidden
states; so do the gate and up projections of a gated MLP. Their LoRA
updates `x @ A_i @ B_i` start with the same `x`: `share_inputs(model)`
groups such layers, and the first one called computes all their updates:
`x @ concat(A_q, A_k, A_v)` as one matmul (reading `x` once instead of
three times; in the backward pass likewise one matmul for the three `A`
gradients and one for `x`'s), then each `B`, those of one shape as one
batched matmul. Each layer then takes its part. The parameters, the
adapter files and the numbers are those of separate adapters: only the
grouping of the work changes.

A layer called with another input than the group's last one (the key and
value of a cross-attention layer read the encoder's states, the query
the decoder's) computes the group's projection of that input instead, so
every result stays exact. With dropout, the group draws one mask for
all its members (one dropout over `x` instead of one per adapter; PEFT
draws one per module). Groups are not saved: `apply_lora`,
`load_adapter` and loading a LoRA-adapted keras-hub backbone form them,
and a model without them computes each adapter on its own.
"""

import keras
from keras import ops

from kft._keras_internals import all_layers
from kft._keras_internals import child_layers
from kft.lora.base import _LoRAMixin
from kft.lora.fused import fused_lora_group

__all__ = ["SHARED_INPUTS", "SharedInput", "share_inputs"]

# Sibling layer names that read one input, in keras-hub's models.
SHARED_INPUTS = (
    ("query", "key", "value"),  # self-attention (BERT, Llama, Gemma ...)
    ("feedforward_gate_dense", "feedforward_intermediate_dense"),  # gated MLP
    ("ffw_gating", "ffw_gating_2"),  # Gemma's gated MLP
)


class SharedInput:
    """LoRA layers whose updates start from one input.

    Their updates are computed together: `x @ concat(A_i)`, one matmul
    reading `x` once; then the `B` side, members of equal rank and width
    stacked into one batched matmul (`(..., g, r) x (g, r, out)`: gate and
    up; key and value under grouped-query attention; query, key and value
    in BERT), the others on their own.

    Args:
        layers: the LoRA layers, with one fan-in, their input's last axis
            contracted, and one dropout rate (in training the group drops
            `x` once: one mask for all of them; DoRA layers with dropout
            are not grouped, their base term needs their own mask).
    """

    def __init__(self, layers):
        self.layers = list(layers)
        self._input = self._kind = None
        self._parts, self._waiting = {}, set()

    @staticmethod
    def _runs(members):
        """Consecutive members of one `B` shape, as lists of indexes."""
        runs = []
        for index, layer in enumerate(members):
            if runs and tuple(members[runs[-1][0]].lora_b.shape) == tuple(
                    layer.lora_b.shape):
                runs[-1].append(index)
            else:
                runs.append([index])
        return runs

    def _compute(self, x, dtype, training):
        """The parts of the members whose adapters run (not merged or
        switched off), by layer; in training, `x` dropped once for all of
        them (the members share one dropout rate)."""
        members = [layer for layer in self.layers if layer.adapter_enabled]
        first = self.layers[0]
        if training and first.dropout:
            x = keras.random.dropout(x, first.dropout, seed=first._dropout_seed)
        batch_shape = ops.shape(x)[:-1]
        a = ops.concatenate(
            [ops.cast(member.lora_a, dtype) for member in members], axis=-1)
        projected = ops.matmul(ops.reshape(ops.cast(x, dtype), (-1, a.shape[0])), a)
        ranks = [member.adapter_rank for member in members]
        parts, start = {}, 0
        for run in self._runs(members):
            rank = ranks[run[0]]
            bs = [members[i]._factors(dtype)[1] for i in run]
            # (g, tokens, r) x (g, r, out): the group axis leads, so each
            # member's result is a contiguous slab (no transposes).
            xa = ops.stack([projected[:, start + k * rank:start + (k + 1) * rank]
                            for k in range(len(run))])
            start += rank * len(run)
            out = ops.matmul(xa, ops.stack(bs))
            for offset, i in enumerate(run):
                parts[members[i]] = ops.reshape(out[offset], (*batch_shape, -1))
        return parts

    def _compute_fused(self, x):
        """Training calls: the members' whole outputs (before bias and
        activation) by `kft.lora.fused.fused_lora_group`, by layer."""
        members = [layer for layer in self.layers if layer._fuses()]
        dtype = keras.backend.standardize_dtype(x.dtype)
        batch_shape = ops.shape(x)[:-1]
        factors = [member._factors(dtype) for member in members]
        outputs = fused_lora_group(
            ops.reshape(x, (-1, members[0]._fans[0])),
            [member._fused_kernel(dtype) for member in members],
            [a for a, _ in factors], [b for _, b in factors])
        return {member: ops.reshape(out, (*batch_shape, *member._output_dims))
                for member, out in zip(members, outputs)}

    def _take(self, layer, x, kind, compute):
        """`layer`'s part of what `compute(x)` gives the group, computed
        when `x` (or `kind`) is not what the group saw last."""
        if x is not self._input or kind != self._kind or layer not in self._parts:
            self._parts = compute(x)
            self._input, self._kind, self._waiting = x, kind, set(self._parts)
        part = self._parts[layer]
        self._waiting.discard(layer)
        if not self._waiting:  # every member has its part: hold no tensor
            self._input, self._parts = None, {}
        return part

    def update(self, layer, x, dtype, training=False):
        """`layer`'s flat update `scale * dropout(x) @ A @ B` in `dtype`."""
        training = bool(training and layer.dropout)
        return self._take(layer, x, (dtype, training),
                          lambda x: self._compute(x, dtype, training))

    def fused(self, layer, x):
        """`layer`'s output before bias and activation in a training call
        (`kft.lora.fused`), computed with its siblings'."""
        return self._take(layer, x, "fused", self._compute_fused)


def _groupable(layer):
    # DoRA's base term needs each layer's own dropped input.
    return (isinstance(layer, _LoRAMixin) and layer.built
            and not (layer.dropout and layer.use_dora)
            and getattr(layer, "_contracted", None) == 1)


def share_inputs(model):
    """Groups the LoRA layers of `model` that read one input (`SHARED_INPUTS`
    among each layer's direct children). Returns the number of groups."""
    for layer in all_layers(model):
        if isinstance(layer, _LoRAMixin):
            layer._kft_shared_input = None
    count = 0
    for parent in all_layers(model, include_self=True):
        children = {child.name: child for child in child_layers(parent)}
        for names in SHARED_INPUTS:
            members = [children[name] for name in names
                       if name in children and _groupable(children[name])]
            fan_ins = {member.lora_a.shape[0] for member in members}
            dropouts = {member.dropout for member in members}
            if len(members) < 2 or len(fan_ins) != 1 or len(dropouts) != 1:
                continue
            group = SharedInput(members)
            for member in members:
                member._kft_shared_input = group
            count += 1
    return count
