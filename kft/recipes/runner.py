"""The runner: recipe -> data + model -> stages -> run directory.

Reads top to bottom like the training script a user would write:
load config, build data and model, fine-tune stage by stage, save and
report.
"""

import datetime
import os
import time

import numpy as np
import yaml

from kft import data as kft_data
from kft import report
from kft.finetune import fine_tune
from kft.freezing import format_trainable_summary
from kft.heads import head_kind
from kft.models import build_classifier
from kft.recipes.errors import RecipeError

__all__ = ["build_data", "default_output_dir", "run_recipe"]


def default_output_dir(config):
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(config.output_dir or "runs", f"{config.name}-{stamp}")


def build_data(data_config, input_shape):
    """Builds the `DataBundle` a recipe's `data:` section describes."""
    image_size = tuple(data_config.image_size or input_shape[:2])
    channels = input_shape[2]
    common = dict(batch_size=data_config.batch_size)
    source = data_config.source
    if source in ("builtin", "numpy"):
        if source == "builtin":
            (x, y), (x_val, y_val), names = kft_data.load_builtin(data_config.name)
        else:
            if not os.path.isfile(data_config.path):
                raise RecipeError(f"data.path: no such file {data_config.path!r}")
            with np.load(data_config.path) as npz:
                missing = [k for k in ("x_train", "y_train") if k not in npz]
                if missing:
                    raise RecipeError(
                        f"data.path: {data_config.path!r} lacks arrays {missing} "
                        "(expected x_train, y_train, optional x_val, y_val, "
                        "class_names)"
                    )
                x, y = npz["x_train"], npz["y_train"]
                x_val = npz["x_val"] if "x_val" in npz else None
                y_val = npz["y_val"] if "y_val" in npz else None
                names = (
                    [str(c) for c in npz["class_names"]]
                    if "class_names" in npz else None
                )
        return kft_data.from_numpy(
            x, y, x_val=x_val, y_val=y_val,
            validation_split=data_config.validation_split,
            image_size=image_size, channels=channels,
            per_class=data_config.per_class, class_names=names,
            num_classes=len(names) if names else None, **common,
        )
    if source == "image_folder":
        return kft_data.from_image_folder(
            data_config.path, image_size=image_size, channels=channels,
            validation_split=data_config.validation_split, **common,
        )
    return kft_data.from_tfds(
        data_config.name, data_dir=data_config.data_dir,
        train_split=data_config.train_split, val_split=data_config.val_split,
        image_size=image_size, channels=channels, **common,
    )


def _input_shape(config):
    from kft import backbones

    model = config.model
    if model.input_shape:
        return tuple(model.input_shape)
    packaged = backbones.get_packaged_weights(model.weights)
    if packaged:
        return tuple(packaged.input_shape)
    size = backbones.get_backbone(model.backbone).default_input_size
    return (size, size, 3)


def _final_metrics(history):
    return {k: float(v[-1]) for k, v in history.history.items() if v}


def run_recipe(config, output_dir=None, verbose="auto"):
    """Runs a validated `RecipeConfig` and writes its run directory.

    Returns:
        `(output_dir, metrics)` where `metrics` is what `metrics.json` holds.
    """
    import keras

    started = time.perf_counter()
    output_dir = output_dir or default_output_dir(config)
    os.makedirs(os.path.join(output_dir, "plots"), exist_ok=True)
    # The resolved config first: even a run that fails says what it was.
    with open(os.path.join(output_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(config.model_dump(mode="json"), f, sort_keys=False)

    keras.utils.set_random_seed(config.seed)
    input_shape = _input_shape(config)
    bundle = build_data(config.data, input_shape)
    data_seconds = time.perf_counter() - started

    model = build_classifier(
        config.model.backbone,
        bundle.num_classes,
        weights=config.model.weights,
        input_shape=input_shape,
        head=config.model.head,
        bn=config.model.bn,
        **config.model.backbone_kwargs,
    )
    if verbose != 0:
        print(f"Run directory: {output_dir}")
        print(format_trainable_summary(model))

    # Epoch rows reach the disk as they happen, so a crash keeps them.
    csv_logger = keras.callbacks.CSVLogger(
        os.path.join(output_dir, "history.csv"), append=True
    )
    histories = fine_tune(
        model, bundle.train, bundle.val, stages=config.stages,
        callbacks=[csv_logger], verbose=verbose,
    )
    train_seconds = sum(h.seconds for h in histories)

    model.save(os.path.join(output_dir, "model.keras"))
    report.write_history_csv(histories, os.path.join(output_dir, "history.csv"))
    report.plot_curves(histories, os.path.join(output_dir, "plots", "curves.png"))

    evaluation = {}
    eval_data = bundle.val if bundle.val is not None else bundle.train
    evaluation = model.evaluate(eval_data, return_dict=True, verbose=0)
    kind = head_kind(model)
    if kind in ("multiclass", "binary"):
        classes = bundle.class_names if kind == "multiclass" else bundle.class_names[:2]
        matrix = report.confusion_matrix(model, eval_data, len(classes))
        report.plot_confusion_matrix(
            matrix, classes,
            os.path.join(output_dir, "plots", "confusion_matrix.png"),
        )
        evaluation["confusion_matrix"] = matrix.tolist()

    metrics = {
        "recipe": config.name,
        "classes": bundle.class_names,
        "final": {
            "train": {k: v for k, v in _final_metrics(histories[-1]).items()
                      if not k.startswith("val_") and k != "learning_rate"},
            ("val" if bundle.val is not None else "train_eval"): evaluation,
        },
        "stages": [
            {
                "name": h.stage,
                "epochs": len(h.epoch),
                "seconds": round(h.seconds, 2),
                "trainable_params": h.trainable_params,
                "final": _final_metrics(h),
            }
            for h in histories
        ],
        "timings": {
            "data_seconds": round(data_seconds, 2),
            "train_seconds": round(train_seconds, 2),
            "total_seconds": round(time.perf_counter() - started, 2),
        },
        "versions": report.versions(),
    }
    report.write_metrics(os.path.join(output_dir, "metrics.json"), metrics)
    return output_dir, metrics
