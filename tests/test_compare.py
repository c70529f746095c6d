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


def test_bad_arguments_exit_2_naming_them(tmp_path, capsys):
    recipe = _image_recipe(tmp_path)
    assert main(["compare", recipe, "--methods", "head,magic"]) == 2
    assert "magic" in capsys.readouterr().err
    assert main(["compare", recipe, "--seeds", "a,b"]) == 2
    assert "--seeds" in capsys.readouterr().err
