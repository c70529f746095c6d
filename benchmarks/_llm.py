"""The SmolLM2-135M-shaped causal LM the LLM benchmarks train, and its data.

Shared by `gpu_llm.py` (GPU step times) and `lora_cost.py` (XLA's cost
and memory analysis of the compiled step): a keras-hub `Llama3Backbone`
built from its config with random weights, adapted one of the ways in
`ADAPTERS`, and random token batches.
"""

import importlib

import numpy as np

# What kft converts SmolLM2-135M-Instruct to (kft.convert.gguf): the
# keras-hub Llama 3 backbone. keras-hub's converter reads no rms_norm_eps;
# 1e-5 is SmolLM2's own.
SMOLLM2 = dict(vocabulary_size=49152, num_layers=30, num_query_heads=9,
               num_key_value_heads=3, hidden_dim=576, intermediate_dim=1536,
               rope_max_wavelength=100000, layer_norm_epsilon=1e-5,
               tie_word_embeddings=True)
TINY = dict(SMOLLM2, vocabulary_size=512, num_layers=2, num_query_heads=4,
            num_key_value_heads=2, hidden_dim=64, intermediate_dim=128)
RANK, ALPHA = 8, 16
# How the model trains:
# - "full": every weight;
# - "kft_lora": kft LoRA, all-linear (q, k, v, o, gate, up, down);
# - "keras_lora": Keras' own `layer.enable_lora(RANK, lora_alpha=ALPHA)` on
#   those layers, the rest frozen by kft;
# - "keras_hub_lora": keras-hub's `backbone.enable_lora(RANK,
#   target_layer_names=...)` on the same layers (alpha = rank);
# - "frozen": no adapter, only the final norm trains (no gradient enters
#   the transformer layers: about the forward pass and the loss);
# - "backward_floor": no adapter, only the first block's input norm trains:
#   the gradient goes back through every layer (as any adapter in the
#   first layer makes it) but no weight gets a gradient of its size. What
#   a step with adapters in every layer moves at the very least.
ADAPTERS = ("full", "kft_lora", "keras_lora", "keras_hub_lora", "frozen",
            "backward_floor")


def import_kft_first():
    """kft's modules before Keras: they then load without TensorFlow."""
    for name in ("kft.lora", "kft.sft", "kft.causal_lm", "kft.remat"):
        importlib.import_module(name)


def all_linear_names():
    """The layer names of kft's "all-linear" preset for Llama 3."""
    from kft.lora.model import LORA_TARGET_PRESETS

    preset = LORA_TARGET_PRESETS["Llama3Backbone"]
    return list(preset["attention"] + preset["mlp"])


def build_lm(config, adapter="full", quantize=None, remat=False):
    """A random `Llama3CausalLM` (no preprocessor), adapted as `adapter` says.

    Args:
        config: `Llama3Backbone` arguments (`SMOLLM2`, `TINY`, or either
            with fewer layers).
        adapter: one of `ADAPTERS`.
        quantize: None, `"int8"` or `"int4"`: the base quantized as
            `kft.build_causal_lm(quantize=...)` does, before the adapters.
        remat: rematerialise each transformer block (`kft.remat.set_remat`,
            what `kft.build_causal_lm(remat=True)` does).

    Returns:
        The keras-hub `CausalLM`, uncompiled.
    """
    import keras_hub

    from kft.backbones.freezing import train_only
    from kft.backbones.remat import set_remat
    from kft.lora.model import apply_lora
    from kft.models.causal_lm import _quantize

    if adapter not in ADAPTERS:
        raise ValueError(f"adapter must be one of {ADAPTERS}. "
                         f"Received: adapter={adapter!r}")
    backbone = keras_hub.models.Llama3Backbone(**config)
    lm = keras_hub.models.Llama3CausalLM(backbone=backbone, preprocessor=None)
    if quantize:
        _quantize(lm, quantize)
    names = set(all_linear_names())
    if adapter == "kft_lora":
        apply_lora(lm, targets="all-linear", rank=RANK, alpha=ALPHA)
    elif adapter == "keras_lora":
        layers = [layer for layer in backbone._flatten_layers()
                  if layer.name in names]
        train_only(lm, layers)
        for layer in layers:
            layer.enable_lora(RANK, lora_alpha=ALPHA)
    elif adapter == "keras_hub_lora":
        backbone.enable_lora(RANK, target_layer_names=sorted(names))
    elif adapter == "frozen":
        train_only(lm, [backbone.get_layer("sequence_output_layernorm")])
    elif adapter == "backward_floor":
        first = backbone.get_layer("transformer_layer_0")
        train_only(lm, [first._self_attention_layernorm])
    if remat:
        set_remat(lm)
    return lm


def batches(steps, batch_size, length, vocabulary_size, seed):
    """`steps` batches of random rows, every token real and weighted."""
    rng = np.random.default_rng(seed)
    rows = steps * batch_size
    tokens = rng.integers(3, vocabulary_size, (rows, length + 1)).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((rows, length), bool)}
    return x, tokens[:, 1:], np.ones((rows, length), "float32")
