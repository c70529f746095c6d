"""kft's PEFT adapters against real Hugging Face PEFT, both ways (issue #17).

What it measures: for a tiny random Llama (and a tiny BERT) saved once as a
Hugging Face checkpoint directory (`config.json` + `model.safetensors`,
written here with numpy), both sides load the same directory: kft through
keras-hub (`Llama3Backbone.from_preset` / `BertBackbone.from_preset`),
PEFT through `transformers` (`LlamaForCausalLM` / `BertModel`). Then:

1. kft -> PEFT: kft applies LoRA (all-linear, rank 8, random non-zero A
   and B), saves `format="peft"`; `peft.PeftModel.from_pretrained` loads
   it. The LoRA tensors PEFT holds must be the saved ones, every one of
   them, and PEFT's logits (BERT: sequence output) must be kft's on the
   same token ids.
2. PEFT -> kft: PEFT creates a LoRA adapter with `init_lora_weights=False`
   (A and B random) on q/k/v/o/gate/up/down (BERT: q/k/v, attention
   output, intermediate and output denses), saves it; kft's
   `load_adapter(..., format="peft")` loads it onto a fresh keras-hub
   model, whose outputs must be PEFT's; kft saves it back, and the tensors
   must be PEFT's unchanged.
3. Both ways again with DoRA (`use_dora`; the magnitudes scaled away from
   the column norms, so that they matter): `lora_magnitude_vector` as
   PEFT names it in the file.

Each case reports the max abs difference of the outputs, next to the max
abs change the adapter makes (so a match is not the trivial one of a
zero adapter) and the base models' own difference. Everything is float32
on the CPU (`JAX_PLATFORMS=cpu`; torch with deterministic algorithms and
no TF32), with `rms_norm_eps=1e-6` (keras-hub's Llama 3 converter does not
read it and uses 1e-6).

Needs torch, transformers and peft (not kft dependencies); without them
`--kft-only` runs the kft half alone (save, then load its own adapter
through `format="peft"`), which is how it is tested locally. kft's modules
are imported before Keras, so that they load without TensorFlow (kft
imports its whole library, TensorFlow included, when Keras is already
loaded).

    JAX_PLATFORMS=cpu KERAS_BACKEND=jax python scripts/device_peft_check.py \\
        [--out peft.json] [--kft-only] [--families llama,bert]

Exits 1 when a case fails (a difference above `--atol` times the largest
output, at least 1, or an error); the JSON holds every case either way.
"""

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
import traceback

import numpy as np
from safetensors.numpy import load_file
from safetensors.numpy import save_file

RANK, ALPHA, SEED = 8, 16, 0
LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
BERT = dict(vocab_size=128, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32)
BATCH, LENGTH = 2, 12
LLAMA_PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                      "up_proj", "down_proj"]
# PEFT matches a target as the module name or its dotted suffix:
# "output.dense" selects both `attention.output.dense` and `output.dense`,
# not the pooler's dense.
BERT_PEFT_TARGETS = ["query", "key", "value", "output.dense",
                     "intermediate.dense"]
_START = time.perf_counter()


def log(message):
    print(f"[{time.perf_counter() - _START:6.1f}s] {message}", flush=True)


def import_kft_first():
    """kft's modules before Keras: they then load without TensorFlow."""
    for name in ("kft.lora", "kft.lora"):
        importlib.import_module(name)


# === Hugging Face checkpoints, written with numpy ===


def _linear(rng, fan_out, fan_in, bias=False):
    weight = rng.normal(0.0, fan_in ** -0.5, (fan_out, fan_in))
    out = {"weight": weight.astype("float32")}
    if bias:
        out["bias"] = rng.normal(0.0, 0.1, (fan_out,)).astype("float32")
    return out


def _norm(rng, size, bias=False):
    out = {"weight": (1.0 + rng.normal(0.0, 0.1, (size,))).astype("float32")}
    if bias:
        out["bias"] = rng.normal(0.0, 0.1, (size,)).astype("float32")
    return out


def _put(state, prefix, params):
    for name, value in params.items():
        state[f"{prefix}.{name}"] = value


def write_llama_checkpoint(directory, seed=SEED):
    """A random `LlamaForCausalLM` checkpoint (tied embeddings, as SmolLM2)."""
    rng = np.random.default_rng(seed)
    c = LLAMA
    hidden, inner = c["hidden_size"], c["intermediate_size"]
    head_dim = hidden // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head_dim
    # Tied: the output head too; logits of a few units.
    state = {"model.embed_tokens.weight": rng.normal(
        0.0, 0.2, (c["vocab_size"], hidden)).astype("float32")}
    _put(state, "model.norm", _norm(rng, hidden))
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        _put(state, f"{p}.input_layernorm", _norm(rng, hidden))
        _put(state, f"{p}.post_attention_layernorm", _norm(rng, hidden))
        for name, out, fan_in in (("q_proj", hidden, hidden), ("k_proj", kv, hidden),
                                  ("v_proj", kv, hidden), ("o_proj", hidden, hidden)):
            _put(state, f"{p}.self_attn.{name}", _linear(rng, out, fan_in))
        for name, out, fan_in in (("gate_proj", inner, hidden),
                                  ("up_proj", inner, hidden),
                                  ("down_proj", hidden, inner)):
            _put(state, f"{p}.mlp.{name}", _linear(rng, out, fan_in))
    config = {**c, "model_type": "llama", "architectures": ["LlamaForCausalLM"],
              "head_dim": head_dim, "hidden_act": "silu", "rms_norm_eps": 1e-6,
              "rope_theta": 10000.0, "max_position_embeddings": 128,
              "tie_word_embeddings": True, "attention_bias": False,
              "mlp_bias": False, "torch_dtype": "float32",
              "bos_token_id": 1, "eos_token_id": 2}
    return _write_checkpoint(directory, state, config)


def write_bert_checkpoint(directory, seed=SEED):
    """A random `BertModel` checkpoint (with its pooler)."""
    rng = np.random.default_rng(seed)
    c = BERT
    hidden, inner = c["hidden_size"], c["intermediate_size"]
    state = {
        "embeddings.word_embeddings.weight": rng.normal(
            0.0, 1.0, (c["vocab_size"], hidden)).astype("float32"),
        "embeddings.position_embeddings.weight": rng.normal(
            0.0, 0.2, (c["max_position_embeddings"], hidden)).astype("float32"),
        "embeddings.token_type_embeddings.weight": rng.normal(
            0.0, 0.2, (2, hidden)).astype("float32"),
    }
    _put(state, "embeddings.LayerNorm", _norm(rng, hidden, bias=True))
    for i in range(c["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        for name in ("query", "key", "value"):
            _put(state, f"{p}.attention.self.{name}",
                 _linear(rng, hidden, hidden, bias=True))
        _put(state, f"{p}.attention.output.dense",
             _linear(rng, hidden, hidden, bias=True))
        _put(state, f"{p}.attention.output.LayerNorm",
             _norm(rng, hidden, bias=True))
        _put(state, f"{p}.intermediate.dense", _linear(rng, inner, hidden, bias=True))
        _put(state, f"{p}.output.dense", _linear(rng, hidden, inner, bias=True))
        _put(state, f"{p}.output.LayerNorm", _norm(rng, hidden, bias=True))
    _put(state, "pooler.dense", _linear(rng, hidden, hidden, bias=True))
    config = {**c, "model_type": "bert", "architectures": ["BertModel"],
              # keras-hub's BERT uses tanh-approximate GELU, whatever
              # the checkpoint's hidden_act says ("gelu" is exact).
              "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-12,
              "type_vocab_size": 2, "hidden_dropout_prob": 0.0,
              "attention_probs_dropout_prob": 0.0, "pad_token_id": 0,
              "torch_dtype": "float32"}
    return _write_checkpoint(directory, state, config)


def _write_checkpoint(directory, state, config):
    os.makedirs(directory, exist_ok=True)
    save_file(state, os.path.join(directory, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return directory


def token_ids(vocab_size, seed=1):
    return np.random.default_rng(seed).integers(
        3, vocab_size, (BATCH, LENGTH)).astype("int32")


# === kft (keras-hub on JAX) ===


def kft_model(family, checkpoint):
    import keras_hub

    if family == "llama":
        backbone = keras_hub.models.Llama3Backbone.from_preset(checkpoint)
        return keras_hub.models.Llama3CausalLM(backbone=backbone,
                                               preprocessor=None)
    return keras_hub.models.BertBackbone.from_preset(checkpoint)


def kft_outputs(family, model, ids):
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids, dtype=bool)}
    if family == "bert":
        inputs["segment_ids"] = np.zeros_like(ids)
        return np.asarray(model(inputs)["sequence_output"], "float32")
    return np.asarray(model(inputs), "float32")


def randomize_adapters(model, seed=3):
    """Non-zero A and B, of a size that changes the outputs clearly."""
    from kft.lora.base import lora_layers

    rng = np.random.default_rng(seed)
    for layer in lora_layers(model):
        a_shape, b_shape = tuple(layer.lora_a.shape), tuple(layer.lora_b.shape)
        layer.lora_a.assign(rng.normal(0.0, a_shape[0] ** -0.5, a_shape))
        layer.lora_b.assign(rng.normal(0.0, 0.5 * b_shape[0] ** -0.5, b_shape))
        if layer.use_dora:  # magnitudes away from the column norms
            magnitude = np.asarray(layer.lora_magnitude)
            layer.lora_magnitude.assign(
                magnitude * rng.uniform(0.5, 1.5, magnitude.shape))


def kft_adapted(family, checkpoint, adapter_dir, ids, use_dora=False):
    """kft: base outputs, then LoRA'd outputs; saves the adapter as PEFT."""
    from kft.lora.io import save_adapter
    from kft.lora.model import apply_lora

    model = kft_model(family, checkpoint)
    base = kft_outputs(family, model, ids)
    count = apply_lora(model, targets="all-linear", rank=RANK, alpha=ALPHA,
                       use_dora=use_dora)
    randomize_adapters(model)
    adapted = kft_outputs(family, model, ids)
    save_adapter(model, adapter_dir, format="peft")
    return base, adapted, count


def kft_loaded(family, checkpoint, adapter_dir, ids, resave_dir):
    """kft loads a PEFT adapter directory; outputs, layer count, and the
    tensors it writes back."""
    from kft.lora.io import load_adapter
    from kft.lora.io import save_adapter

    model = kft_model(family, checkpoint)
    base = kft_outputs(family, model, ids)
    count = load_adapter(model, adapter_dir, format="peft")
    outputs = kft_outputs(family, model, ids)
    save_adapter(model, resave_dir, format="peft")
    return outputs, count, base


def _read_adapter(directory):
    with open(os.path.join(directory, "adapter_config.json")) as f:
        config = json.load(f)
    return config, load_file(os.path.join(directory, "adapter_model.safetensors"))


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, "float64") - np.asarray(b, "float64"))))


def _tensor_diff(first, second):
    """(same key set, max abs difference over shared keys)."""
    shared = sorted(set(first) & set(second))
    worst = max((_max_diff(first[k], second[k]) for k in shared), default=None)
    return set(first) == set(second), worst


# === PEFT (transformers on torch, CPU) ===


def _torch():
    import torch

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    return torch


def hf_model(family, checkpoint):
    import transformers

    torch = _torch()
    cls = (transformers.LlamaForCausalLM if family == "llama"
           else transformers.BertModel)
    model = cls.from_pretrained(checkpoint, dtype=torch.float32,
                                attn_implementation="eager")
    return model.eval()


def hf_outputs(family, model, ids):
    torch = _torch()
    with torch.no_grad():
        input_ids = torch.as_tensor(ids, dtype=torch.long)
        mask = torch.ones_like(input_ids)
        if family == "llama":
            return model(input_ids=input_ids, attention_mask=mask).logits.numpy()
        return model(input_ids=input_ids, attention_mask=mask,
                     token_type_ids=torch.zeros_like(input_ids)
                     ).last_hidden_state.numpy()


def peft_loads(family, checkpoint, adapter_dir, ids):
    """PEFT loads kft's adapter: outputs, its LoRA tensors, the base's
    outputs (adapter disabled) and the scaling of one module."""
    import peft

    model = peft.PeftModel.from_pretrained(hf_model(family, checkpoint),
                                           adapter_dir).eval()
    outputs = hf_outputs(family, model, ids)
    with model.disable_adapter():
        base = hf_outputs(family, model, ids)
    # As PEFT's file names them: no adapter name, DoRA's magnitude without
    # its `.weight`.
    state = {k.replace(".default.weight", ".weight").replace(
                 "lora_magnitude_vector.weight", "lora_magnitude_vector"):
             v.float().numpy()
             for k, v in model.state_dict().items() if ".lora_" in k}
    scalings = sorted({float(m.scaling["default"]) for m in model.modules()
                       if isinstance(getattr(m, "scaling", None), dict)
                       and "default" in m.scaling})
    return outputs, base, state, scalings


def peft_creates(family, checkpoint, adapter_dir, ids, **lora_options):
    """PEFT makes a random adapter (init_lora_weights=False) and saves it."""
    import peft

    torch = _torch()
    task = "CAUSAL_LM" if family == "llama" else None
    targets = LLAMA_PEFT_TARGETS if family == "llama" else BERT_PEFT_TARGETS
    options = dict(r=RANK, lora_alpha=ALPHA, lora_dropout=0.05,
                   target_modules=targets, init_lora_weights=False,
                   task_type=task)
    options.update(lora_options)
    torch.manual_seed(SEED)  # A and B: torch's Linear init, not zero
    model = peft.get_peft_model(hf_model(family, checkpoint),
                                peft.LoraConfig(**options)).eval()
    with torch.no_grad():  # DoRA: magnitudes away from the column norms
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(torch.empty_like(param).uniform_(0.5, 1.5))
    outputs = hf_outputs(family, model, ids)
    with model.disable_adapter():
        base = hf_outputs(family, model, ids)
    model.save_pretrained(adapter_dir)
    return outputs, base


# === Cases ===


def case_kft_to_peft(family, checkpoint, work, ids, kft_only, use_dora=False):
    name = "_dora" if use_dora else ""
    adapter = os.path.join(work, f"{family}_kft_adapter{name}")
    kft_base, kft_out, count = kft_adapted(family, checkpoint, adapter, ids,
                                           use_dora=use_dora)
    config, tensors = _read_adapter(adapter)
    result = {"lora_layers": count, "tensors": len(tensors),
              "target_modules": config["target_modules"],
              "task_type": config.get("task_type"),
              "adapter_effect_max_abs": _max_diff(kft_out, kft_base),
              "output_abs_max": float(np.abs(kft_out).max())}
    if kft_only:  # kft reads its own PEFT directory back
        loaded, n, _ = kft_loaded(family, checkpoint, adapter, ids,
                               os.path.join(work, f"{family}_kft_resaved{name}"))
        result.update(kft_reload_layers=n,
                      kft_reload_max_abs_diff=_max_diff(loaded, kft_out))
        result["max_abs_diff"] = result["kft_reload_max_abs_diff"]
        return result
    peft_out, peft_base, state, scalings = peft_loads(family, checkpoint,
                                                      adapter, ids)
    same_keys, tensor_diff = _tensor_diff(tensors, state)
    result.update(
        peft_tensors=len(state), same_tensor_names=same_keys,
        tensor_max_abs_diff=tensor_diff, peft_scalings=scalings,
        base_max_abs_diff=_max_diff(peft_base, kft_base),
        max_abs_diff=_max_diff(peft_out, kft_out))
    if not same_keys:
        result["only_in_kft"] = sorted(set(tensors) - set(state))[:5]
        result["only_in_peft"] = sorted(set(state) - set(tensors))[:5]
    return result


def case_peft_to_kft(family, checkpoint, work, ids, name="", **lora_options):
    adapter = os.path.join(work, f"{family}_peft_adapter{name}")
    resaved = os.path.join(work, f"{family}_peft_resaved{name}")
    peft_out, peft_base = peft_creates(family, checkpoint, adapter, ids,
                                       **lora_options)
    config, tensors = _read_adapter(adapter)
    kft_out, count, kft_base = kft_loaded(family, checkpoint, adapter, ids,
                                          resaved)
    _, back = _read_adapter(resaved)
    same_keys, tensor_diff = _tensor_diff(tensors, back)
    return {"peft_config": {k: config.get(k) for k in (
                "r", "lora_alpha", "use_rslora", "use_dora", "target_modules",
                "task_type", "rank_pattern", "alpha_pattern", "peft_version")},
            "tensors": len(tensors), "kft_lora_layers": count,
            "adapter_effect_max_abs": _max_diff(peft_out, peft_base),
            "output_abs_max": float(np.abs(peft_out).max()),
            "base_max_abs_diff": _max_diff(kft_base, peft_base),
            "max_abs_diff": _max_diff(kft_out, peft_out),
            "resaved_same_tensor_names": same_keys,
            "resaved_tensor_max_abs_diff": tensor_diff}


def run_cases(families, kft_only, work):
    writers = {"llama": write_llama_checkpoint, "bert": write_bert_checkpoint}
    vocab = {"llama": LLAMA["vocab_size"], "bert": BERT["vocab_size"]}
    cases = []
    for family in families:
        checkpoint = writers[family](os.path.join(work, f"{family}_hf"))
        ids = token_ids(vocab[family])
        plan = [("kft_to_peft", lambda f=family, c=checkpoint, i=ids:
                 case_kft_to_peft(f, c, work, i, kft_only)),
                ("kft_to_peft_dora", lambda f=family, c=checkpoint, i=ids:
                 case_kft_to_peft(f, c, work, i, kft_only, use_dora=True))]
        if not kft_only:
            plan.append(("peft_to_kft_dora", lambda f=family, c=checkpoint, i=ids:
                         case_peft_to_kft(f, c, work, i, name="_dora",
                                          use_dora=True)))
            plan.append(("peft_to_kft", lambda f=family, c=checkpoint, i=ids:
                         case_peft_to_kft(f, c, work, i)))
            # rsLoRA and a per-module rank (rank_pattern), PEFT's way.
            pattern = ({"q_proj": 4} if family == "llama" else {"query": 4})
            plan.append(("peft_to_kft_rslora_rank_pattern",
                         lambda f=family, c=checkpoint, i=ids, p=pattern:
                         case_peft_to_kft(f, c, work, i, name="_rs",
                                          use_rslora=True, rank_pattern=p)))
        for name, run in plan:
            log(f"{family} {name} ...")
            try:
                result = run()
                tolerance = ARGS.atol * max(1.0, result["output_abs_max"])
                result["ok"] = bool(result["max_abs_diff"] <= tolerance)
            except Exception as error:  # report and go on
                result = {"ok": False, "error": f"{type(error).__name__}: {error}",
                          "traceback": traceback.format_exc()[-3000:]}
            result.update(family=family, case=name)
            log(f"{family} {name}: " + json.dumps(
                {k: v for k, v in result.items() if k != "traceback"}))
            cases.append(result)
    return cases


def versions():
    found = {"python": sys.version.split()[0]}
    for name in ("keras", "keras_hub", "jax", "numpy", "torch", "transformers",
                 "peft", "safetensors"):
        try:
            found[name] = importlib.import_module(name).__version__
        except Exception as error:  # noqa: BLE001 - reported, not raised
            found[name] = f"missing ({type(error).__name__})"
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="results JSON file")
    parser.add_argument("--kft-only", action="store_true",
                        help="without torch / peft: kft saves and reloads")
    parser.add_argument("--families", default="llama,bert")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="tolerance, times max(1, largest |output|)")
    global ARGS
    ARGS = parser.parse_args()
    import_kft_first()
    families = [f.strip() for f in ARGS.families.split(",") if f.strip()]
    with tempfile.TemporaryDirectory() as work:
        cases = run_cases(families, ARGS.kft_only, work)
    import keras

    report = {"versions": versions(), "backend": keras.backend.backend(),
              "atol": ARGS.atol, "rank": RANK, "alpha": ALPHA,
              "kft_only": ARGS.kft_only, "cases": cases,
              "all_ok": all(c["ok"] for c in cases)}
    if ARGS.out:
        with open(ARGS.out, "w") as f:
            json.dump(report, f, indent=1)
    for c in cases:
        print(f"{c['family']:<6}{c['case']:<34}"
              f"{'ok' if c['ok'] else 'FAIL':<6}"
              f"max_abs_diff={c.get('max_abs_diff', 'n/a')} "
              f"effect={c.get('adapter_effect_max_abs', 'n/a')}")
    return 0 if report["all_ok"] else 1


ARGS = None

if __name__ == "__main__":
    sys.exit(main())
