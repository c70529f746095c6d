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
