"""The Colab notebooks: stored clean, in sync with their source, and they
run top to bottom in small mode (KFT_NOTEBOOK_SMOKE=1, offline)."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
NAMES = sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb"))


def _load(name):
    with open(os.path.join(NOTEBOOKS, name)) as f:
        return json.load(f)


def _code(notebook):
    return [c["source"] if isinstance(c["source"], str) else "".join(c["source"])
            for c in notebook["cells"] if c["cell_type"] == "code"]


def test_the_tutorial_notebooks_exist():
    assert NAMES == ["01_image_transfer_learning.ipynb", "02_augmentation.ipynb",
                     "03_text_lora.ipynb", "04_recipes.ipynb",
                     "05_pretrained_models.ipynb"]


def _assets_ready():
    """05 runs the packaged recipes of the large optional assets."""
    import shutil

    from kft.convert.assets import converted_path

    try:
        for name in ("efficientnet-lite0", "smollm2", "whisper-tiny"):
            converted_path(name, name)
    except FileNotFoundError:
        return False
    return (os.path.isfile("/usr/share/wordnet/data.noun")
            and shutil.which("espeak-ng") is not None)


def _run_params():
    large = [pytest.mark.large, pytest.mark.skipif(not _assets_ready(), reason=(
        "needs the converted EfficientNet-Lite0, SmolLM2 and Whisper tiny.en "
        "(scripts/prepare_assets.py), wordnet-base and espeak-ng"))]
    return [pytest.param(name, marks=large) if name.startswith("05_") else name
            for name in NAMES]


@pytest.mark.parametrize("name", NAMES)
def test_stored_notebooks_carry_no_outputs(name):
    for cell in _load(name)["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


@pytest.mark.parametrize("name", NAMES)
def test_badge_install_cell_and_public_api_only(name):
    notebook = _load(name)
    first = notebook["cells"][0]["source"]
    assert f"blob/main/notebooks/{name})" in first and "colab-badge.svg" in first
    code = _code(notebook)
    assert "%pip install" in code[0] and "KFT_NOTEBOOK_SMOKE" in code[0]
    for source in code:
        assert "keras.src" not in source
        assert not re.search(r"\bkft(\.\w+)*\._\w", source), source
        assert not re.search(r"from kft(\.\w+)* import _", source), source


def test_stored_notebooks_match_their_source(tmp_path):
    before = {n: _load(n) for n in NAMES}
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts",
                                                 "make_notebooks.py")],
                   check=True, capture_output=True)
    assert {n: _load(n) for n in NAMES} == before, (
        "notebooks/ differ from scripts/make_notebooks.py: run it and commit")


@pytest.mark.slow
@pytest.mark.parametrize("name", _run_params())
def test_notebook_runs_top_to_bottom_in_small_mode(name, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("KFT_NOTEBOOK_SMOKE", "1")
    # The kernel's `!kft` finds the console script of this environment.
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep
                       + os.environ.get("PATH", ""))
    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    text = "\n".join(
        output.get("text", "") for cell in notebook.cells
        if cell.cell_type == "code" for output in cell.outputs)
    assert "Traceback" not in text and "kft: " not in text, text[-2000:]
