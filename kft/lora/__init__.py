"""LoRA for Keras: low-rank adapters on frozen Dense, EinsumDense, Conv2D
and Embedding layers.

A LoRA layer computes `x @ W + b + (alpha / rank) * dropout(x) @ A @ B`
with `W` (and `b`) frozen, so the full weight gradient is never formed
(Keras' `Dense.enable_lora` rebuilds the merged kernel every step). It
has dropout, `merge()` / `unmerge()`, and saves its adapters as weights
of their own. In training, a Dense / EinsumDense LoRA layer runs as one
matmul `x @ (W + scale A B)` with a gradient that forms no weight
gradient either (`kft.lora.fused`). `apply_lora` adapts the matching
layers of a built model in place (keras-hub backbones included);
`save_adapter` / `load_adapter` write and read the adapters alone.

Variants, as PEFT names them: DoRA (`use_dora=True`, see
`kft.lora.base`), the initialisations `init="default" | "gaussian" |
"pissa" | "olora"` (`kft.lora.initializers`), LoRA for Conv2D (`kft.lora.conv`)
and Embedding (`kft.lora.embedding`), and LoRA+ learning rates
(`kft.optimizers.loraplus`).

Several adapters can live on one base under names (`load_adapter(...,
name=)`, `set_adapter`, `combine_adapters`: `kft.lora.adapters`), and
`disable_adapters` runs the plain base.

QLoRA: the base may be quantized by Keras (`model.quantize("int8")` or
`"int4"`), before `apply_lora` (the usual order) or after it. The frozen
base then runs through Keras' own int8 / int4 path and the float32
adapters are added to its output (training calls on Keras' grouped int4
base dequantize it once a step for `kft.lora.fused` instead); `merge`
requantizes (see `merge_lora`
for the error this adds). `.keras` files keep such a model as it is (int8
or packed int4 kernel, scales, adapters); adapter files load onto a base
quantized the same way. DoRA and PiSSA / OLoRA need a float kernel when
they start (PiSSA then QLoRA: `apply_lora(init="pissa")` on the float
model, then `model.quantize(...)` quantizes the residual); a DoRA layer
stays float when the model is quantized later.

The package, by role: `config` (`LoRAConfig`), `base` (the layer mixin:
adapters, DoRA, merge), `dense`, `conv`, `embedding` (the layers),
`initializers`, `model` (targets, `apply_lora`, `merge_lora`), `shared`
(adapters that read one input computed together), `fused` (the training
call's matmul and gradient), `adapters` (named
adapters), `io` (adapter files) and `peft_families` /
`peft_save` / `peft_load` (Hugging Face PEFT's format). Add a LoRA
variant in `base` / `initializers`, a layer type beside `dense`.
Imports: `kft.backbones`, `kft.utils`.
"""

from kft._lazy import attach

_EXPORTS = {
    "active_adapter": "kft.lora.adapters",
    "apply_lora": "kft.lora.model",
    "combine_adapters": "kft.lora.adapters",
    "adapters_disabled": "kft.lora.adapters",
    "disable_adapters": "kft.lora.adapters",
    "enable_adapters": "kft.lora.adapters",
    "INITS": "kft.lora.initializers",
    "load_adapter": "kft.lora.io",
    "load_peft_adapter": "kft.lora.peft_load",
    "lora_layers": "kft.lora.base",
    "LORA_TARGET_PRESETS": "kft.lora.model",
    "LoRAConfig": "kft.lora.config",
    "LoRAConv2D": "kft.lora.conv",
    "LoRADense": "kft.lora.dense",
    "LoRAEinsumDense": "kft.lora.dense",
    "LoRAEmbedding": "kft.lora.embedding",
    "LoRAReversibleEmbedding": "kft.lora.embedding",
    "merge_lora": "kft.lora.model",
    "plain_lora_weights": "kft.lora.initializers",
    "save_adapter": "kft.lora.io",
    "save_peft_adapter": "kft.lora.peft_save",
    "set_adapter": "kft.lora.adapters",
    "supported_architectures": "kft.lora.peft_families",
}
__getattr__, __dir__, __all__ = attach(__name__, _EXPORTS)
