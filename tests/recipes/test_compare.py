"""`kft compare`: every method on a tiny model, failures isolated, reruns
skip finished work."""

import json
import os

import numpy as np
import pytest
import yaml
from conftest import make_images

import kft
from kft.cli import main

FIELDS = {"status", "monitor", "best", "final", "trainable_params",
          "total_params", "trainable_share", "peak_memory_mb",
          "median_step_seconds", "train_seconds", "wall_seconds",
          "stored_bytes", "stored"}


def _image_recipe(tmp_path):
    x, y = make_images(24, classes=3)
    np.savez(tmp_path / "data.npz", x_train=x, y_train=y)
    path = tmp_path / "image.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny_image",
        "model": {"backbone": "mobilenet_v2", "input_shape": [32, 32, 3],
                  "backbone_kwargs": {"alpha": 0.35}},
        "data": {"source": "numpy", "path": str(tmp_path / "data.npz"),
                 "batch_size": 8, "validation_split": 0.25},
        "stages": [{"name": "head", "epochs": 2}],
    }))
    return str(path)


def _distilbert_preset(folder):
    """DistilBERT takes LoRA but not prompt tuning (no segment embedding):
    a real failure for one method."""
    keras_hub = pytest.importorskip("keras_hub")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad"]
    keras_hub.models.DistilBertTokenizer(vocabulary=vocab).save_to_preset(folder)
    keras_hub.models.DistilBertBackbone(
        vocabulary_size=len(vocab), num_layers=1, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=32).save_to_preset(folder)
    return folder


def test_image_methods_run_in_their_own_processes_and_report_every_field(tmp_path):
    out = str(tmp_path / "cmp")
    report = kft.compare(_image_recipe(tmp_path),
                         ["head", "full", "gradual", "discriminative", "lora",
                          "prompt"],
                         output_dir=out, smoke=True, verbose=False)
    summary = report["methods"]
    assert summary["prompt"]["status"] == "skipped"
    assert "image model" in summary["prompt"]["reason"]
    runs = {r["method"]: r for r in report["runs"]}
    # LoRA on the CNN's 1x1 convolutions, plus the head.
    assert runs["head"]["trainable_params"] < runs["lora"]["trainable_params"] \
        < runs["full"]["trainable_params"] / 5
    for method in ("head", "full", "gradual", "discriminative", "lora"):
        assert runs[method]["status"] == "ok", runs[method]
        assert FIELDS <= set(runs[method]), method
        assert runs[method]["peak_memory_mb"] > 100  # a TensorFlow process
        assert summary[method]["status"] == "ok"
        assert method in report["advice"]
    # Head-only trains fewer weights than full fine-tuning; both store
    # the whole model.
    assert runs["head"]["trainable_params"] < runs["full"]["trainable_params"]
    assert runs["full"]["stored"] == "model.keras"
    for name in ("compare.json", "compare.csv", "compare.md", "compare.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    assert json.load(open(os.path.join(out, "compare.json")))["epochs"] == 2
    table = open(os.path.join(out, "compare.md")).read()
    assert table.count("\n| ") >= 6 and "skipped" in table


def test_a_failing_method_is_reported_and_the_others_complete_and_reruns_skip(
        tmp_path, capsys):
    preset = _distilbert_preset(str(tmp_path / "preset"))
    texts = tmp_path / "texts.csv"
    texts.write_text("text,label\n" + "".join(
        f"{'good' if i % 2 else 'bad'} {i},{i % 2}\n" for i in range(16)))
    recipe = tmp_path / "text.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny_text",
        "model": {"text": preset, "sequence_length": 8},
        "data": {"source": "text_file", "path": str(texts), "batch_size": 4},
        "stages": [{"name": "train", "epochs": 1}],
    }))
    out = str(tmp_path / "cmp")
    code = main(["compare", str(recipe), "--methods", "lora,prompt",
                 "--smoke", "--output-dir", out])
    assert code == 1  # a method failed; the comparison is still written
    report = json.load(open(os.path.join(out, "compare.json")))
    runs = {r["method"]: r for r in report["runs"]}
    assert runs["lora"]["status"] == "ok"
    assert runs["lora"]["stored"] == "adapter.npz"
    assert runs["lora"]["trainable_share"] < 0.5
    assert runs["prompt"]["status"] == "failed"
    assert "prompt_tuning" in runs["prompt"]["error"]
    assert "BERT-family" in runs["prompt"]["error"]

    lora_log = os.path.join(out, "lora", "seed_0", "log.txt")
    before = os.path.getmtime(lora_log)
    capsys.readouterr()
    main(["compare", str(recipe), "--methods", "lora", "--smoke",
          "--output-dir", out])
    assert "lora seed 0: kept" in capsys.readouterr().out
    assert os.path.getmtime(lora_log) == before


def test_lora_variant_methods_run_on_a_text_model(tmp_path):
    """dora, pissa and loraplus: the lora method's adapters (same targets
    and rank) with use_dora, init pissa, lr_ratio 16."""
    preset = _distilbert_preset(str(tmp_path / "preset"))
    texts = tmp_path / "texts.csv"
    texts.write_text("text,label\n" + "".join(
        f"{'good' if i % 2 else 'bad'} {i},{i % 2}\n" for i in range(16)))
    recipe = tmp_path / "text.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny_text",
        "model": {"text": preset, "sequence_length": 8},
        "data": {"source": "text_file", "path": str(texts), "batch_size": 4},
        "stages": [{"name": "train", "epochs": 1}],
    }))
    out = str(tmp_path / "cmp")
    report = kft.compare(str(recipe), ["dora", "pissa", "loraplus"],
                         output_dir=out, smoke=True, verbose=False)
    runs = {r["method"]: r for r in report["runs"]}
    for method, option in (("dora", {"use_dora": True}),
                           ("pissa", {"init": "pissa"}),
                           ("loraplus", {"lr_ratio": 16})):
        assert runs[method]["status"] == "ok", runs[method]
        assert runs[method]["stored"] == "adapter.npz"
        folder = os.path.join(out, method, "seed_0")
        lora = yaml.safe_load(open(os.path.join(folder, "recipe.yaml")))["lora"]
        assert lora == {"targets": ["query", "value"], "rank": 8, "alpha": 16,
                        **option}
        stages = yaml.safe_load(open(os.path.join(folder, "run",
                                                  "config.yaml")))["stages"]
        assert stages[0]["lora_lr_ratio"] == (16 if method == "loraplus" else None)
    # DoRA adds a magnitude per output unit of query and value (hidden 8).
    assert runs["dora"]["trainable_params"] == runs["pissa"]["trainable_params"] + 16
    assert runs["loraplus"]["trainable_params"] == runs["pissa"]["trainable_params"]


def _causal_recipe(tmp_path):
    """A tiny random Llama 3 (Hugging Face directory) on 16 SFT pairs."""
    from llm_fixtures import tiny_causal_lm
    from llm_fixtures import write_hf_checkpoint

    checkpoint = write_hf_checkpoint(tiny_causal_lm(sequence_length=16),
                                     tmp_path / "tiny")
    with open(tmp_path / "sft.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": f"{a} {b}", "completion": f" {b} {a}"})
                     + "\n" for a in "abcd" for b in "abcd")
    path = tmp_path / "causal.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny_sft",
        "model": {"causal_lm": checkpoint, "sequence_length": 16},
        "data": {"source": "sft_file", "path": str(tmp_path / "sft.jsonl"),
                 "batch_size": 4, "validation_split": 0.25, "packing": True},
        "lora": {"targets": "all-linear", "rank": 2, "alpha": 4},
        "stages": [{"name": "sft", "epochs": 1, "steps_per_epoch": 2,
                    "optimizer": "adamw", "learning_rate": 1e-3}],
    }))
    return str(path)


def test_causal_lm_methods_full_lora_qlora_prompt(tmp_path):
    out = str(tmp_path / "cmp")
    report = kft.compare(_causal_recipe(tmp_path),
                         ["full", "lora", "qlora", "prompt", "head", "gradual",
                          "discriminative"], output_dir=out, verbose=False)
    summary, runs = report["methods"], {r["method"]: r for r in report["runs"]}
    for method in ("head", "gradual", "discriminative"):
        assert summary[method]["status"] == "skipped"
        assert "causal-LM methods: full, lora, qlora, prompt" in \
            summary[method]["reason"]
    for method in ("full", "lora", "qlora", "prompt"):
        run = runs[method]
        assert run["status"] == "ok", run
        assert FIELDS | {"perplexity", "model_bytes"} <= set(run), method
        assert run["monitor"] == "val_loss"  # held-out completion NLL
        assert run["perplexity"] == pytest.approx(np.exp(run["best"]), rel=1e-3)
    # 20 virtual tokens x hidden 32 < the same adapters on a float or int4
    # base < every weight.
    assert runs["prompt"]["trainable_params"] == 20 * 32
    assert runs["prompt"]["trainable_params"] < runs["lora"]["trainable_params"] \
        == runs["qlora"]["trainable_params"] < runs["full"]["trainable_params"]
    assert runs["full"]["trainable_share"] == 1.0
    # The int4 base holds fewer bytes; what is kept after training is the
    # prompt, the adapters or all the weights.
    assert runs["qlora"]["model_bytes"] < 0.6 * runs["lora"]["model_bytes"]
    assert runs["lora"]["model_bytes"] == pytest.approx(
        runs["prompt"]["model_bytes"] + 4 * (runs["lora"]["trainable_params"]
                                             - 20 * 32), rel=0.01)
    assert [runs[m]["stored"] for m in ("prompt", "lora", "full")] == [
        "prompt.npz", "adapter.npz", "model.weights.h5"]
    assert runs["prompt"]["stored_bytes"] < runs["lora"]["stored_bytes"] \
        < runs["full"]["stored_bytes"]
    derived = {m: yaml.safe_load(open(os.path.join(out, m, "seed_0",
                                                   "recipe.yaml")))
               for m in ("qlora", "prompt", "full")}
    assert derived["qlora"]["model"]["quantize"] == "int4"
    assert derived["prompt"]["data"]["packing"] is False
    assert derived["full"]["lora"] is None
    assert derived["full"]["stages"][0]["steps_per_epoch"] == 2  # the recipe's
    table = open(os.path.join(out, "compare.md")).read()
    assert "perplexity" in table and "model variables" in table


def test_lora_variant_methods_on_a_causal_lm(tmp_path):
    """dora and loraplus on a causal LM: the causal `lora` method (all-linear,
    rank 8) with use_dora, or lr_ratio 16 at a quarter of its rate."""
    out = str(tmp_path / "cmp")
    report = kft.compare(_causal_recipe(tmp_path), ["dora", "loraplus"],
                         output_dir=out, verbose=False)
    runs = {r["method"]: r for r in report["runs"]}
    derived = {m: yaml.safe_load(open(os.path.join(out, m, "seed_0",
                                                   "recipe.yaml")))
               for m in runs}
    for method, option in (("dora", {"use_dora": True}),
                           ("loraplus", {"lr_ratio": 16})):
        assert runs[method]["status"] == "ok", runs[method]
        assert runs[method]["stored"] == "adapter.npz"
        assert derived[method]["lora"] == {"targets": "all-linear", "rank": 8,
                                           "alpha": 16, **option}
    assert derived["loraplus"]["stages"][0]["learning_rate"] == pytest.approx(
        derived["dora"]["stages"][0]["learning_rate"] / 4)
    assert runs["dora"]["trainable_params"] > runs["loraplus"]["trainable_params"]


def test_bad_arguments_exit_2_naming_them(tmp_path, capsys):
    recipe = _image_recipe(tmp_path)
    assert main(["compare", recipe, "--methods", "head,magic"]) == 2
    assert "magic" in capsys.readouterr().err
    assert main(["compare", recipe, "--seeds", "a,b"]) == 2
    assert "--seeds" in capsys.readouterr().err
