"""Prompt tuning for decoder-only causal LMs: virtual tokens before the prompt.

Lester et al. (2021), as PEFT's `PromptTuningConfig` for `CAUSAL_LM`: the
whole base model stays frozen, and `num_virtual_tokens` trainable
embeddings (float32, `(num_virtual_tokens, hidden_dim)`) are placed before
every sequence. `prompt_tune_causal_lm(lm)` returns a
`PromptTunedCausalLM`, which trains on `kft.sft.sft_dataset` batches
unchanged:

- it embeds the token ids `(B, L)` with the backbone's token embedding,
  prepends the virtual embeddings, runs the backbone's transformer layers
  over the `n + L` positions with a causal mask (the padding mask is
  extended with ones for the virtual tokens), then the final norm and the
  LM head;
- it returns the logits of the `L` real positions only, so `y` and
  `sample_weight` line up as they are.

keras-hub's `lm.generate` embeds token ids inside its cached loop and has
no public hook for extra embeddings, so `generate(model, prompt)` here is
a plain greedy loop without a cache: see its docstring for the cost.
`save_prompt` / `load_prompt` write and read the virtual tokens alone.

Only rotary-position decoders (Llama, Llama 3, Mistral, Mixtral, Qwen,
Qwen 3, their MoE variants, Phi-3, SmolLM3) are supported: their
transformer layers take a `decoder_attention_mask`, and rotary embeddings
depend only on the distance between tokens, so nothing else needs to know
about the extra positions. Packed rows (`segment_ids`) are refused: the
virtual tokens would sit at a different distance before each packed
example than before an example alone.
"""

import hashlib
import json

import keras
import numpy as np
from keras import ops

from kft.backbones.anatomy import family_entry
from kft.backbones.freezing import freeze
from kft.sft.model import SFTCausalLM
from kft.utils.safe_npz import read_npz_with_meta

__all__ = [
    "PROMPT_FAMILIES",
    "PromptTunedCausalLM",
    "base_fingerprint",
    "generate",
    "load_prompt",
    "prefix_causal_mask",
    "prompt_tune_causal_lm",
    "save_prompt",
]

_PROMPT_FORMAT = "kft-prompt/1"

# Backbone class -> the attribute of its final norm. Their transformer
# layers take `decoder_attention_mask`, positions are rotary, and the task's
# logits are `token_embedding(norm(x), reverse=True)`.
PROMPT_FAMILIES = {
    "LlamaBackbone": "layer_norm",
    "Llama3Backbone": "layer_norm",
    "MistralBackbone": "layer_norm",
    "MixtralBackbone": "layer_norm",
    "QwenBackbone": "layer_norm",
    "Qwen3Backbone": "layer_norm",
    "QwenMoeBackbone": "layer_norm",
    "Qwen3MoeBackbone": "layer_norm",
    "Phi3Backbone": "layer_norm",
    "SmolLM3Backbone": "norm",
}


def _final_norm(backbone):
    return family_entry(backbone, PROMPT_FAMILIES, missing=(
        "Prompt tuning for causal LMs supports the rotary-position decoders "
        f"{sorted(PROMPT_FAMILIES)}. Received: a {type(backbone).__name__}."))


def _check_lm(lm):
    backbone = getattr(lm, "backbone", None)
    if backbone is None or not hasattr(backbone, "transformer_layers"):
        raise ValueError("lm must be a keras-hub CausalLM (with a backbone). "
                         f"Received: {type(lm).__name__}")
    _final_norm(backbone)
    return backbone


def _check_count(num_virtual_tokens):
    if (isinstance(num_virtual_tokens, bool)
            or not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1):
        raise ValueError("num_virtual_tokens must be an integer >= 1. "
                         f"Received: num_virtual_tokens={num_virtual_tokens!r}")


def prefix_causal_mask(padding_mask, num_virtual_tokens):
    """`(B, n + L, n + L)` int32 causal mask over `n` virtual tokens + `L`
    real ones, where no position attends to padding (the virtual tokens are
    never padding, so no row is empty)."""
    padding_mask = ops.cast(padding_mask, "int32")
    batch = ops.shape(padding_mask)[0]
    keys = ops.concatenate(
        [ops.ones((batch, num_virtual_tokens), "int32"), padding_mask], axis=1)
    index = ops.arange(ops.shape(keys)[1])
    causal = ops.cast(ops.greater_equal(index[:, None], index[None, :]), "int32")
    return ops.expand_dims(causal, 0) * ops.expand_dims(keys, 1)


@keras.saving.register_keras_serializable(package="kft")
class PromptTunedCausalLM(SFTCausalLM):
    """A frozen keras-hub causal LM with trainable virtual tokens before
    every sequence.

    It takes the token-id batches of `kft.sft.sft_dataset` (unpacked) and
    returns the logits of the real positions, `(B, L, vocabulary)`. Only
    `virtual_tokens` trains: `lm` is frozen in place (and shared: its
    weights are not copied). Its `anatomy` is `lm`'s, as `SFTCausalLM`'s
    (`task="causal_lm"`, `logits=True`). Build it with
    `prompt_tune_causal_lm`, which can start the virtual tokens from a
    text's embeddings.

    Args:
        lm: a keras-hub `CausalLM` of a family in `PROMPT_FAMILIES`.
        num_virtual_tokens: how many virtual tokens.
        initializer: the initializer of the `(num_virtual_tokens,
            hidden_dim)` float32 embeddings; default random normal (0.02).
            `prompt_tune_causal_lm` picks a better start.
        **kwargs: for `keras.Model` (e.g. `name`).
    """

    def __init__(self, lm, num_virtual_tokens=20, initializer=None, **kwargs):
        _check_count(num_virtual_tokens)
        backbone = _check_lm(lm)
        kwargs.setdefault("name", f"prompt_tuned_{lm.name}")
        super().__init__(lm, **kwargs)
        freeze(lm)
        self.num_virtual_tokens = num_virtual_tokens
        self._norm = _final_norm(backbone)
        hidden_dim = backbone.token_embedding.output_dim
        # Float32 whatever the base's dtype, as LoRA weights: a bfloat16
        # embedding would lose small updates.
        self.virtual_tokens = self.add_weight(
            name="virtual_tokens", shape=(num_virtual_tokens, hidden_dim),
            initializer=initializer or keras.initializers.RandomNormal(
                stddev=0.02), dtype="float32")
        self.built = True

    def call(self, inputs, training=None):
        if "segment_ids" in inputs:
            raise ValueError(
                "PromptTunedCausalLM takes unpacked rows: with packing the "
                "virtual tokens would sit at a different distance before each "
                "packed example. Build the data with packing=False. Received "
                "inputs with 'segment_ids'.")
        backbone, n = self.lm.backbone, self.num_virtual_tokens
        token_ids = inputs["token_ids"]
        padding_mask = inputs.get("padding_mask")
        if padding_mask is None:
            padding_mask = ops.ones(ops.shape(token_ids), "int32")
        x = backbone.token_embedding(token_ids)
        virtual = ops.cast(self.virtual_tokens, x.dtype)[None]
        virtual = ops.broadcast_to(virtual, (ops.shape(x)[0], *virtual.shape[1:]))
        x = ops.concatenate([virtual, x], axis=1)
        mask = prefix_causal_mask(padding_mask, n)
        for layer in backbone.transformer_layers:
            x = layer(x, decoder_attention_mask=mask, training=training)
        x = getattr(backbone, self._norm)(x[:, n:])
        return backbone.token_embedding(x, reverse=True)

    def compile(self, optimizer="auto", loss="auto", **kwargs):
        """`SFTCausalLM.compile`, with `optimizer="auto"` Adam(3e-2): prompt
        tuning needs a far larger learning rate than full fine-tuning
        (PEFT's examples use 3e-2; Lester et al. 0.3 with Adafactor)."""
        if isinstance(optimizer, str) and optimizer == "auto":
            optimizer = keras.optimizers.Adam(3e-2)
        super().compile(optimizer=optimizer, loss=loss, **kwargs)

    def get_config(self):
        config = super().get_config()
        config["num_virtual_tokens"] = self.num_virtual_tokens
        return config


def _embedding_std(backbone):
    """The standard deviation of (up to 1024 spread-out rows of) the token
    embeddings: random virtual tokens at the scale the layers expect."""
    vocabulary = backbone.token_embedding.input_dim
    ids = np.unique(np.linspace(0, vocabulary - 1, 1024).astype("int32"))
    # A layer call, not the table: it also reads a quantized embedding.
    rows = backbone.token_embedding(ids[None])
    return float(np.std(ops.convert_to_numpy(ops.cast(rows, "float32"))))


def _text_embeddings(lm, text, num_virtual_tokens):
    """The embeddings of `text`'s tokens, cut or repeated to
    `num_virtual_tokens` rows (PEFT's `prompt_tuning_init="TEXT"`)."""
    if not isinstance(text, str) or not text:
        raise ValueError("init_text must be a non-empty string. Received: "
                         f"init_text={text!r}")
    tokenizer = getattr(getattr(lm, "preprocessor", None), "tokenizer", None)
    if tokenizer is None:
        raise ValueError("init_text needs lm's tokenizer, and lm has no "
                         "preprocessor. Received: lm.preprocessor=None")
    ids = np.asarray(ops.convert_to_numpy(tokenizer(text))).reshape(-1).tolist()
    if not ids:
        raise ValueError(f"init_text {text!r} has no tokens.")
    ids = (ids * -(-num_virtual_tokens // len(ids)))[:num_virtual_tokens]
    # A layer call, not the table: it also reads a quantized embedding.
    rows = lm.backbone.token_embedding(np.asarray([ids], "int32"))[0]
    return ops.convert_to_numpy(ops.cast(rows, "float32"))


def prompt_tune_causal_lm(lm, num_virtual_tokens=20, init_text=None, *, seed=0):
    """Prompt tuning for a keras-hub causal LM: a `PromptTunedCausalLM`.

    The base is frozen; only `num_virtual_tokens` float32 embeddings, placed
    before every sequence, train. Train it on unpacked
    `kft.sft.sft_dataset` batches; see what it learned with `generate`.

    Args:
        lm: a keras-hub `CausalLM` (from `kft.build_causal_lm`) of a family
            in `PROMPT_FAMILIES`; float or quantized.
        num_virtual_tokens: how many virtual tokens.
        init_text: start the virtual tokens from the embeddings of this
            text's tokens, repeated or cut to `num_virtual_tokens` (PEFT's
            `prompt_tuning_init="TEXT"`; a task description such as
            "Define the word:" usually trains faster than random). None:
            random normal at the scale of the token embeddings.
        seed: the seed of the random start.

    Returns:
        A `PromptTunedCausalLM` sharing `lm`'s (frozen) weights.

    Example:

    ```python
    model = kft.prompt_causal.prompt_tune_causal_lm(
        lm, 20, init_text="Define the word:")
    model.compile()  # Adam(3e-2), loss on the completion tokens
    model.fit(kft.data.sft_dataset(records, lm), epochs=3)
    kft.prompt_causal.generate(model, "Define: cat\\n", max_length=64)
    ```
    """
    _check_count(num_virtual_tokens)
    backbone = _check_lm(lm)
    if init_text is not None:
        initializer = keras.initializers.Constant(
            _text_embeddings(lm, init_text, num_virtual_tokens))
    else:
        initializer = keras.initializers.RandomNormal(
            stddev=_embedding_std(backbone), seed=seed)
    return PromptTunedCausalLM(lm, num_virtual_tokens, initializer)


# === Generation ===


def _check_model(model, what):
    if not isinstance(model, PromptTunedCausalLM):
        raise ValueError(f"{what} takes a PromptTunedCausalLM (from "
                         "prompt_tune_causal_lm). Received: "
                         f"{type(model).__name__}")


def _stop_ids(tokenizer):
    names = ("end_token_id", "end_token2_id")
    return sorted({getattr(tokenizer, n) for n in names
                   if getattr(tokenizer, n, None) is not None})


def _greedy(model, token_ids, prompt_mask, stop_ids):
    """Fills each row after its prompt with the most likely next tokens.

    Returns the token ids and the mask of what to keep: the prompt, then
    the generated tokens through the first stop token.
    """
    everything = np.ones_like(prompt_mask)
    keep, done = prompt_mask.copy(), np.zeros(len(token_ids), bool)
    for index in range(max(int(prompt_mask.sum(axis=1).min()), 1),
                       token_ids.shape[1]):
        # The same shapes every step: `predict_on_batch` traces once.
        logits = model.predict_on_batch(
            {"token_ids": token_ids, "padding_mask": everything})
        next_ids = np.argmax(logits[:, index - 1], axis=-1).astype("int32")
        new = ~prompt_mask[:, index]
        token_ids[:, index] = np.where(new, next_ids, token_ids[:, index])
        keep[:, index] = prompt_mask[:, index] | ~done
        done |= new & np.isin(next_ids, stop_ids)
        if done.all():
            break
    return token_ids, keep


def _as_strings(outputs):
    if hasattr(outputs, "numpy"):  # a tf.Tensor of strings
        outputs = outputs.numpy()
    outputs = np.asarray(outputs).reshape(-1).tolist()
    return [o.decode("utf-8") if isinstance(o, bytes) else o for o in outputs]


def generate(model, prompts, max_length=None):
    """Greedy generation through the prompt-tuned forward pass.

    keras-hub's `lm.generate` would ignore the virtual tokens (it embeds
    token ids inside its cached loop, with no public hook for extra
    embeddings), so this is a plain greedy loop, without a key/value cache:
    every new token reruns the whole model over `num_virtual_tokens +
    max_length` positions. Generating k tokens costs k full forward passes
    (about k times keras-hub's cached `generate` for long outputs): enough
    to see what training taught, not a way to serve the model.

    Args:
        model: a `PromptTunedCausalLM` whose `lm` has a preprocessor.
        prompts: a string or a list of strings.
        max_length: tokens per row, prompt included (the start token too);
            default the preprocessor's `sequence_length`.

    Returns:
        The prompts with their continuations (until the tokenizer's end
        token or `max_length`): a string, or a list for a list.

    Example:

    ```python
    kft.prompt_causal.generate(model, "Define: cat\\n", max_length=48)
    ```
    """
    _check_model(model, "generate")
    preprocessor = getattr(model.lm, "preprocessor", None)
    if preprocessor is None:
        raise ValueError("generate needs the model's tokenizer, and model.lm "
                         "has no preprocessor. Received: model.lm.preprocessor="
                         "None")
    max_length = max_length or preprocessor.sequence_length
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError("max_length must be an integer >= 2. Received: "
                         f"max_length={max_length!r}")
    single = isinstance(prompts, str)
    inputs = preprocessor.generate_preprocess(
        [prompts] if single else list(prompts), sequence_length=max_length)
    token_ids = np.array(ops.convert_to_numpy(inputs["token_ids"]), "int32")
    prompt_mask = np.array(ops.convert_to_numpy(inputs["padding_mask"]), bool)
    token_ids, keep = _greedy(model, token_ids, prompt_mask,
                              _stop_ids(preprocessor.tokenizer))
    texts = _as_strings(preprocessor.generate_postprocess(
        {"token_ids": token_ids, "padding_mask": keep}))
    return texts[0] if single else texts


# === Saving the virtual tokens alone ===


def base_fingerprint(lm):
    """A hash of the base architecture: the backbone's class and config
    (vocabulary, sizes, layers ...), not its dtype or quantization: a prompt
    trained on a float base can run on the same base quantized."""
    backbone = _check_lm(lm)
    config = {k: v for k, v in backbone.get_config().items()
              if k not in ("name", "dtype", "trainable")}
    text = json.dumps([type(backbone).__name__, config], sort_keys=True,
                      default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_prompt(model, path):
    """Writes the virtual tokens alone, with a fingerprint of the base.

    Args:
        model: a `PromptTunedCausalLM`.
        path: the `.npz` file to write (a few kilobytes: `n x hidden`
            float32 values and a JSON header).

    Returns:
        `path`.
    """
    _check_model(model, "save_prompt")
    meta = {"format": _PROMPT_FORMAT,
            "num_virtual_tokens": model.num_virtual_tokens,
            "family": model.anatomy.family,
            "fingerprint": base_fingerprint(model.lm)}
    with open(path, "wb") as f:
        np.savez(f, __meta__=np.array(json.dumps(meta)),
                 virtual_tokens=ops.convert_to_numpy(model.virtual_tokens))
    return path


def _read_prompt(path):
    meta, arrays = read_npz_with_meta(path, "a kft prompt file")
    values = arrays.get("virtual_tokens")
    if meta.get("format") != _PROMPT_FORMAT or values is None:
        raise ValueError(f"{path!r} is not a kft prompt file (format "
                         f"{meta.get('format')!r}; this kft reads "
                         f"{_PROMPT_FORMAT!r}).")
    return meta, values


def load_prompt(model_or_lm, path):
    """Loads virtual tokens written by `save_prompt`.

    Args:
        model_or_lm: a `PromptTunedCausalLM` with the same number of
            virtual tokens, or a keras-hub `CausalLM` (it is wrapped in a
            new `PromptTunedCausalLM` first).
        path: a file from `save_prompt`.

    Returns:
        The `PromptTunedCausalLM` holding the loaded virtual tokens.
    """
    meta, values = _read_prompt(path)
    model = model_or_lm
    if not isinstance(model, PromptTunedCausalLM):
        model = PromptTunedCausalLM(model_or_lm, meta["num_virtual_tokens"])
    here = base_fingerprint(model.lm)
    if here != meta["fingerprint"]:
        raise ValueError(
            f"The prompt in {path!r} was trained on a different base model "
            f"({meta['family']}, fingerprint {meta['fingerprint']}); this "
            f"model is a {model.anatomy.family}, fingerprint {here}.")
    if tuple(values.shape) != tuple(model.virtual_tokens.shape):
        raise ValueError(
            f"The prompt in {path!r} has {values.shape[0]} virtual tokens; "
            f"the model has {model.num_virtual_tokens}. Received: "
            f"shape {values.shape}, expected {tuple(model.virtual_tokens.shape)}")
    model.virtual_tokens.assign(values)
    return model
