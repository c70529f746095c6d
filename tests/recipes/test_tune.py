"""`kft tune`: search spaces in recipes, studies on Optuna, resume after
SIGKILL, pruning, results (tiny models, a few steps)."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from kft.cli import main
from kft.recipes import RecipeError
from kft.recipes import load_recipe
from kft.recipes import unregister_task

SPACE = {
    "stages.1.learning_rate": {"loguniform": [1.0e-5, 1.0e-2]},
    "stages.1.trainable.last_n_blocks": {"int": [1, 4]},
    "data.batch_size": {"choice": [4, 8]},
}


def _recipe(tmp_path, space=None, epochs=(1, 2), **search):
    """A tiny image recipe (MobileNetV2 alpha 0.35, 32 px, 24 images) with
    a `search:` section."""
    import numpy as np
    from conftest import make_images

    x, y = make_images(24, classes=2)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y)
    recipe = {
        "name": "tiny",
        "model": {"backbone": "mobilenet_v2", "input_shape": [32, 32, 3],
                  "backbone_kwargs": {"alpha": 0.35}, "weights": None},
        "data": {"source": "numpy", "path": str(tmp_path / "d.npz"),
                 "batch_size": 8, "validation_split": 0.25, "shuffle": False},
        "callbacks": {"checkpoints": False},
        "stages": [
            {"name": "head", "epochs": epochs[0], "steps_per_epoch": 2},
            {"name": "top", "epochs": epochs[1], "steps_per_epoch": 2,
             "trainable": {"last_n_blocks": 2}, "learning_rate": 1.0e-3}],
        "search": {"space": SPACE if space is None else space, **search},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


# === The search: section ===

def test_a_search_section_validates_and_kft_run_ignores_it(tmp_path):
    config = load_recipe(_recipe(tmp_path))
    assert config.search.space["stages.1.learning_rate"].kind == "loguniform"
    assert config.search.trials == 20 and config.search.pruner == "median"
    from kft.recipes.loader import resolved

    # The resolved recipe keeps the space as written, and reloads.
    data = resolved(config)
    assert data["search"]["space"]["data.batch_size"] == {"choice": [4, 8]}
    assert "search" not in resolved(load_recipe("quickstart"))


@pytest.mark.parametrize("key, distribution, message", [
    ("stages.1.learning_rat", {"loguniform": [1e-5, 1e-2]},
     "search.space.stages.1.learning_rat: unknown key "
     "(did you mean 'stages.1.learning_rate'?)"),
    ("stages.1.learning_rate", {"loguniform": [0, 1e-2]},
     "search.space.stages.1.learning_rate: loguniform needs low > 0"),
    ("stages.1.learning_rate", {"uniform": [0.1, 0.01]},
     "search.space.stages.1.learning_rate: uniform needs low < high"),
    ("stages.1.learning_rate", {"uniform": [0.1, 0.1]},
     "search.space.stages.1.learning_rate: uniform needs low < high"),
    ("data.batch_size", {"choice": []},
     "search.space.data.batch_size: choice needs at least one value"),
    ("lora.rank", {"int": [2, 8]},
     "search.space.lora.rank: lora is not set in this recipe"),
    ("stages.5.epochs", {"int": [1, 2]},
     "search.space.stages.5.epochs: stages is a list of 2 item(s)"),
    ("data.batch_size", {"uniform": [4, 16]},
     "search.space.data.batch_size: an integer key"),
    ("stages.1.trainable.last_n_blocks", {"int": [-1, 3]},
     "search.space.stages.1.trainable.last_n_blocks: the recipe is invalid "
     "with -1"),
    ("stages.1.learning_rate", {"logunifrm": [1e-5, 1e-2]},
     "unknown distribution 'logunifrm' (did you mean 'loguniform'?)"),
    ("stages.1.learning_rate", {"int": [1.5, 3]},
     "int takes two integers"),
])
def test_a_bad_space_exits_2_naming_the_key_before_any_training(
        tmp_path, capsys, key, distribution, message):
    path = _recipe(tmp_path, {key: distribution})
    with pytest.raises(RecipeError, match="search.space"):
        load_recipe(path)
    assert main(["validate", path]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    # kft tune checks it the same way, before a study or a run exists.
    out = tmp_path / "study"
    assert main(["tune", path, "--output-dir", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_search_settings_are_checked(tmp_path):
    for search, key in [({"pruner": "asha"}, "search.pruner"),
                        ({"trials": 0}, "search.trials"),
                        ({"direction": "up"}, "search.direction"),
                        ({"sampler": "tpe"}, "search.sampler")]:
        with pytest.raises(RecipeError, match=key):
            load_recipe(_recipe(tmp_path, **search))


def test_a_recipe_without_a_space_is_not_tuned(tmp_path, capsys):
    assert main(["tune", "quickstart", "--output-dir", str(tmp_path / "s")]) == 2
    assert "no search: section" in capsys.readouterr().err


# === Studies ===

def _rows(study_dir):
    with open(os.path.join(study_dir, "trials.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _value_at(data, key):
    for part in key.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def test_a_three_trial_study_writes_trials_best_recipe_and_plots(tmp_path, capsys):
    import kft

    study_dir = str(tmp_path / "study")
    result = kft.tune(_recipe(tmp_path), 3, output_dir=study_dir)
    rows = _rows(study_dir)
    assert [r["number"] for r in rows] == ["0", "1", "2"]
    assert {r["state"] for r in rows} <= {"COMPLETE", "PRUNED"}
    assert set(rows[0]) >= {"number", "state", "val_accuracy", "seconds",
                            *SPACE}
    for row in rows:  # each trial is a normal run in its own directory
        assert row["run_dir"] == os.path.join(study_dir,
                                              f"trial_{int(row['number']):03d}")
        assert os.path.exists(os.path.join(row["run_dir"], "config.yaml"))
    assert result["metric"] == "val_accuracy"
    assert result["direction"] == "maximize"
    best = result["best"]
    assert best["value"] == max(float(r["val_accuracy"]) for r in rows
                                if r["state"] == "COMPLETE")
    # best.yaml is a plain recipe with the best trial's values.
    best_path = os.path.join(study_dir, "best.yaml")
    assert open(best_path).readline().startswith("# kft run ")
    config = load_recipe(best_path)
    assert config.search is None
    data = yaml.safe_load(open(best_path))
    for key, value in best["params"].items():
        assert _value_at(data, key) == value
    row = rows[best["number"]]
    assert float(row["stages.1.learning_rate"]) == pytest.approx(
        best["params"]["stages.1.learning_rate"])
    for name in ("history.png", "parallel_coordinates.png"):
        assert os.path.getsize(os.path.join(study_dir, name)) > 0
    capsys.readouterr()
    assert main(["tune", "--show", study_dir]) == 0
    shown = capsys.readouterr().out
    assert "stages.1.learning_rate" in shown and "best.yaml" in shown
    assert len([line for line in shown.splitlines()
                if line.split()[:1] in (["0"], ["1"], ["2"])]) == 3
    # A second study in the same directory needs --resume.
    assert main(["tune", _recipe(tmp_path), "--output-dir", study_dir]) == 2
    assert "--resume" in capsys.readouterr().err


# The toy regression task of test_tasks.py, installed as a plugin so that
# `kft tune` in a child process knows it; its trials take about a second.
TOY_RECIPE = """\
name: toy
task: toy_regression
model: {backbone: mobilenet_v2}
data: {source: numpy, path: unused.npz, batch_size: 16}
callbacks: {checkpoints: false}
stages:
  - {name: fit, epochs: EPOCHS, trainable: all, learning_rate: 0.2}
search:
  SEARCH
"""


@pytest.fixture
def toy_task(tmp_path, monkeypatch):
    from test_tasks import install_toy_plugin

    install_toy_plugin(tmp_path, monkeypatch)

    def recipe(search, epochs=4):
        path = tmp_path / "toy.yaml"
        path.write_text(TOY_RECIPE.replace("EPOCHS", str(epochs))
                        .replace("SEARCH", search))
        return str(path)

    yield recipe
    unregister_task("toy_regression")
    sys.modules.pop("kft_toy_task", None)


def test_a_study_killed_mid_trial_resumes_to_the_requested_count(
        toy_task, tmp_path, capsys):
    recipe = toy_task("space: {stages.0.learning_rate: {loguniform: "
                      "[1.0e-3, 0.2]}}\n  pruner: none", epochs=6)
    study_dir = str(tmp_path / "study")
    command = [sys.executable, "-m", "kft.cli", "tune", recipe, "--trials", "4",
               "--output-dir", study_dir]
    with open(tmp_path / "log.txt", "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        killed = os.path.join(study_dir, "trial_001", "config.yaml")
        deadline = time.monotonic() + 240
        while not os.path.exists(killed) and child.poll() is None:
            assert time.monotonic() < deadline, "no second trial started"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL, open(tmp_path / "log.txt").read()
    first = os.path.join(study_dir, "trial_000", "metrics.json")
    first_written = os.path.getmtime(first)

    assert main(["tune", recipe, "--output-dir", study_dir, "--resume"]) == 0
    rows = _rows(study_dir)
    numbers = [int(r["number"]) for r in rows]
    assert len(numbers) == len(set(numbers))
    finished = [r for r in rows if r["state"] in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4
    cut = rows[1]
    assert cut["state"] == "FAIL" and cut["error"] == ""
    retry = [r for r in rows if r["retry_of"] == "1"]
    assert len(retry) == 1 and retry[0]["state"] == "COMPLETE"
    assert retry[0]["stages.0.learning_rate"] == cut["stages.0.learning_rate"]
    assert os.path.getmtime(first) == first_written  # trial 0 was kept
    assert rows[0]["state"] == "COMPLETE"
    # Resuming a finished study runs nothing; a changed recipe is refused.
    capsys.readouterr()
    assert main(["tune", recipe, "--output-dir", study_dir, "--resume"]) == 0
    assert len(_rows(study_dir)) == len(rows)
    assert main(["tune", recipe, "--output-dir", study_dir, "--resume",
                 "--set", "stages.0.epochs=3"]) == 2
    assert "another recipe" in capsys.readouterr().err
    assert main(["tune", recipe, "--output-dir", str(tmp_path / "none"),
                 "--resume"]) == 2


def test_the_median_pruner_stops_bad_trials_early(toy_task, tmp_path):
    import kft

    # Half the space does not learn (rate 1e-6): once a trial has finished,
    # such trials fall behind the median at their first epoch.
    recipe = toy_task("space: {stages.0.learning_rate: {choice: [1.0e-6, "
                      "0.1]}}\n  startup_trials: 1\n  seed: 0", epochs=5)
    result = kft.tune(recipe, 6, output_dir=str(tmp_path / "study"),
                      verbose=False)
    assert result["metric"] == "val_loss" and result["direction"] == "minimize"
    rows = _rows(result["study_dir"])
    pruned = [r for r in rows if r["state"] == "PRUNED"]
    assert pruned, rows
    for row in pruned:
        assert float(row["stages.0.learning_rate"]) == 1e-6
        assert int(row["epochs"]) < 5  # stopped before its last epoch
    assert result["best"]["params"] == {"stages.0.learning_rate": 0.1}
    assert len([r for r in rows if r["state"] in ("COMPLETE", "PRUNED")]) == 6


def test_workers_on_one_database_url_share_a_study(toy_task, tmp_path):
    """Two workers (one after the other here) on one `--storage` URL: the
    second joins the first's study and runs only the trials still missing;
    no trial number twice. (PostgreSQL with live workers is left for CI.)"""
    recipe = toy_task("space: {stages.0.learning_rate: {loguniform: "
                      "[1.0e-3, 0.2]}}\n  pruner: none", epochs=2)
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    first, second = str(tmp_path / "worker_1"), str(tmp_path / "worker_2")
    assert main(["tune", recipe, "--storage", url, "--trials", "2",
                 "--output-dir", first, "--quiet"]) == 0
    assert main(["tune", recipe, "--storage", url, "--trials", "3",
                 "--output-dir", second, "--quiet"]) == 0
    rows = _rows(second)
    assert [r["number"] for r in rows] == ["0", "1", "2"]
    assert {r["state"] for r in rows} == {"COMPLETE"}
    assert rows[0]["run_dir"].startswith(first)
    assert rows[2]["run_dir"].startswith(second)
    assert not os.path.exists(os.path.join(first, "study.db"))
