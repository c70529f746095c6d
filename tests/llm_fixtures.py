"""A tiny random Llama 3 causal LM with a byte-level BPE tokenizer, for tests.

The tokenizer knows the 256 byte symbols, a few merges (`"Ġa"`, `"Ġb"` ...:
" a", " b" are one token each) and the ChatML special tokens of SmolLM2:
`<|im_start|>` (the start token), `<|im_end|>` (the end token) and
`<|endoftext|>`. `write_hf_checkpoint` saves a model as a local Hugging Face
directory with a chat template in its `tokenizer_config.json`.
"""

import json
import os

__all__ = [
    "CHAT_TEMPLATE",
    "MERGES",
    "SPECIAL_TOKENS",
    "tiny_causal_lm",
    "tiny_tokenizer",
    "tiny_vocabulary",
    "write_hf_checkpoint",
]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MERGES = ("Ġ a", "Ġ b", "Ġ c", "Ġ d", "Ġ e", "h e", "l l", "he ll")
# SmolLM2-Instruct's template without its default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _byte_symbols():
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def tiny_vocabulary():
    """`{token: id}`: byte symbols, merged tokens, then the special tokens."""
    tokens = _byte_symbols() + ["".join(m.split()) for m in MERGES]
    tokens += list(SPECIAL_TOKENS)
    return {token: i for i, token in enumerate(tokens)}


def tiny_tokenizer():
    """A `keras_hub.tokenizers.Llama3Tokenizer` over `tiny_vocabulary()`."""
    import keras_hub

    return keras_hub.tokenizers.Llama3Tokenizer(
        vocabulary=tiny_vocabulary(), merges=list(MERGES),
        bos_token="<|im_start|>", eos_token="<|im_end|>",
        misc_special_tokens={"<|endoftext|>"})


def tiny_causal_lm(sequence_length=32, *, num_layers=2, hidden_dim=32,
                   tie_word_embeddings=True, chat_template=CHAT_TEMPLATE,
                   seed=0):
    """A random `Llama3CausalLM` (2 layers, hidden 32, 4 heads / 2 KV heads).

    `chat_template` is recorded as `lm.chat_template`, as
    `kft.build_causal_lm` does for a checkpoint that has one.
    """
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    tokenizer = tiny_tokenizer()
    backbone = keras_hub.models.Llama3Backbone(
        vocabulary_size=tokenizer.vocabulary_size(), num_layers=num_layers,
        num_query_heads=4, num_key_value_heads=2, hidden_dim=hidden_dim,
        intermediate_dim=2 * hidden_dim,
        tie_word_embeddings=tie_word_embeddings)
    preprocessor = keras_hub.models.Llama3CausalLMPreprocessor(
        tokenizer, sequence_length=sequence_length)
    lm = keras_hub.models.Llama3CausalLM(backbone=backbone,
                                         preprocessor=preprocessor)
    lm.chat_template = chat_template
    return lm


def write_hf_checkpoint(lm, directory, chat_template=CHAT_TEMPLATE):
    """Saves `lm` as a Hugging Face checkpoint directory and returns its path.

    `config.json`, `model.safetensors`, `tokenizer.json` and
    `tokenizer_config.json` (with `chat_template` when given), as keras-hub's
    `export_to_transformers` writes them.
    """
    directory = os.fspath(directory)
    lm.export_to_transformers(directory)
    config_path = os.path.join(directory, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if chat_template:
        config["chat_template"] = chat_template
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return directory
