"""Packed rows on a causal-LM backbone: for each family kft packs, how its
embeddings take explicit positions and which attribute is its final norm
(its transformer layers take a `decoder_attention_mask`).
"""

from keras import ops

from kft.backbones.anatomy import family_entry

__all__ = ["PACKING_FAMILIES", "packing_spec"]


def _token_embeddings(backbone, token_ids, positions):
    # Rotary position embeddings depend only on the distance between query
    # and key, so a packed example's scores equal those it has alone.
    del positions
    return backbone.token_embedding(token_ids)


def _learned_position_embeddings(backbone, token_ids, positions):
    table = backbone.position_embedding.position_embeddings
    x = backbone.embeddings_add(
        (backbone.token_embedding(token_ids), ops.take(table, positions, axis=0)))
    return backbone.embeddings_dropout(x)


_ROPE = (_token_embeddings, "layer_norm")

# Backbone class -> (embeddings(backbone, token_ids, positions), final norm
# attribute). Their transformer layers take `decoder_attention_mask`, and the
# task's logits are `token_embedding(norm(x), reverse=True)`.
PACKING_FAMILIES = {
    "LlamaBackbone": _ROPE,
    "Llama3Backbone": _ROPE,
    "MistralBackbone": _ROPE,
    "MixtralBackbone": _ROPE,
    "QwenBackbone": _ROPE,
    "Qwen3Backbone": _ROPE,
    "QwenMoeBackbone": _ROPE,
    "Qwen3MoeBackbone": _ROPE,
    "Phi3Backbone": _ROPE,
    "SmolLM3Backbone": (_token_embeddings, "norm"),
    "GPT2Backbone": (_learned_position_embeddings, "layer_norm"),
}


def packing_spec(backbone):
    return family_entry(backbone, PACKING_FAMILIES, missing=(
        "packing=True needs a block-diagonal attention mask inside the "
        f"transformer layers, which kft gives {sorted(PACKING_FAMILIES)}; "
        f"{type(backbone).__name__} is not among them. Use packing=False."))
