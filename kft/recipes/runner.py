"""The runner: recipe -> data + model -> stages -> run directory.

Reads top to bottom like the training script a user would write:
load config, build data and model, fine-tune stage by stage, save and
report.
"""

import datetime
import hashlib
import json
import os
import shutil
import tempfile
import time

import numpy as np
import yaml

from kft import data as kft_data
from kft import report
from kft.callbacks import NonFiniteLoss
from kft.callbacks import StopOnNonFiniteLoss
from kft.distribute import make_strategy
from kft.finetune import fine_tune
from kft.freezing import format_trainable_summary
from kft.heads import head_kind
from kft.models import build_classifier
from kft.recipes.checkpoint import RunCheckpoint
from kft.recipes.checkpoint import read_history
from kft.recipes.checkpoint import read_state
from kft.recipes.checkpoint import write_history
from kft.recipes.errors import RecipeError

__all__ = ["build_data", "build_model", "config_hash", "default_output_dir", "evaluate",
           "run_recipe", "smoke_config"]


def default_output_dir(config):
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(config.output_dir or "runs", f"{config.name}-{stamp}")


def build_data(data_config, input_shape):
    """Builds the `DataBundle` a recipe's `data:` section describes."""
    if data_config.source in ("text_file", "fortunes"):
        return _text_data(data_config)
    image_size = tuple(data_config.image_size or input_shape[:2])
    channels = input_shape[2]
    common = dict(batch_size=data_config.batch_size, shuffle=data_config.shuffle)
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
        try:
            return kft_data.from_image_folder(
                data_config.path, image_size=image_size, channels=channels,
                validation_split=data_config.validation_split,
                on_bad_file=data_config.on_bad_file, **common,
            )
        except ValueError as error:
            raise RecipeError(f"data.path: {error}") from None
    return kft_data.from_tfds(
        data_config.name, data_dir=data_config.data_dir,
        train_split=data_config.train_split, val_split=data_config.val_split,
        image_size=image_size, channels=channels,
        download=data_config.download, **common,
    )


def _text_data(data_config):
    if data_config.source == "text_file":
        if not os.path.isfile(data_config.path):
            raise RecipeError(f"data.path: no such file {data_config.path!r}")
        try:
            texts, labels, names = kft_data.load_text_file(
                data_config.path, data_config.text_column,
                data_config.label_column)
        except ValueError as error:
            raise RecipeError(f"data.path: {error}") from None
        if data_config.per_class:
            labels_array = np.asarray(labels)
            keep = kft_data.subset_per_class(
                np.arange(len(labels)), labels_array, data_config.per_class)[0]
            texts = [texts[i] for i in keep]
            labels = labels_array[keep].tolist()
    else:
        topics = data_config.topics or kft_data.FORTUNES_TOPICS
        try:
            texts, labels, names = kft_data.load_fortunes(
                topics, data_dir=data_config.data_dir,
                per_topic=data_config.per_class)
        except ValueError as error:
            raise RecipeError(f"data.topics: {error}") from None
    return kft_data.from_texts(
        texts, labels, batch_size=data_config.batch_size,
        shuffle=data_config.shuffle,
        validation_split=data_config.validation_split, class_names=names)


def _input_shape(config):
    from kft import backbones

    model = config.model
    if model.text is not None:
        return ()
    if model.input_shape:
        return tuple(model.input_shape)
    packaged = backbones.get_packaged_weights(model.weights)
    if packaged:
        return tuple(packaged.input_shape)
    size = backbones.get_backbone(model.backbone).default_input_size
    return (size, size, 3)


_PYTHON_ONLY = {"stages": {"__all__": {"callbacks", "loss", "metrics"}}}


def resolved(config):
    """The recipe with every default filled in, as plain data."""
    return config.model_dump(mode="json", exclude=_PYTHON_ONLY)


def augment_training_data(train, augmentation, seed):
    """Applies a recipe's `augmentation:` to the training batches."""
    import tensorflow as tf

    from kft.augment import ImageAugmentation

    layer = ImageAugmentation(**augmentation.model_dump(), seed=seed).layer()
    return train.map(lambda x, y: (layer(x, training=True), y),
                     num_parallel_calls=tf.data.AUTOTUNE)


def config_hash(config):
    """sha256 of the resolved recipe (what the run really used)."""
    text = json.dumps(resolved(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def smoke_config(config):
    """The recipe shrunk to a wiring check: random weights, two steps per
    stage (over two epochs, so unfreezing schedules fire), tiny batches."""
    stages = []
    for stage in config.stages:
        update = {"epochs": min(stage.epochs, 2), "steps_per_epoch": 1}
        if stage.lr_find:
            update["lr_find"] = {"start_lr": 1e-6, "end_lr": 1.0, "num_steps": 3}
        stages.append(stage.model_copy(update=update))
    model = config.model
    if model.text is None:
        model = model.model_copy(update={"weights": None})
    data = config.data.model_copy(update={"batch_size": min(config.data.batch_size, 4)})
    return config.model_copy(update={"model": model, "data": data, "stages": stages})


def synthetic_data(config, input_shape):
    """Random images of the recipe's shape, 2 or 3 classes, for --smoke."""
    from kft.heads import HeadConfig

    head = HeadConfig.from_value(config.model.head)
    classes = 2 if head.kind == "binary" else 3
    rng = np.random.default_rng(config.seed)
    n = 4 * classes
    if config.model.text is not None:
        words = ["alpha", "beta", "gamma", "delta", "data", "model", "text"]
        texts = [" ".join(rng.choice(words, 6)) for _ in range(n)]
        return kft_data.from_texts(
            texts, np.arange(n) % classes, batch_size=config.data.batch_size,
            validation_split=0.25,
            class_names=[f"class_{i}" for i in range(classes)])
    x = rng.uniform(0, 255, (n, *input_shape)).astype("float32")
    y = np.arange(n) % classes
    return kft_data.from_numpy(
        x, y, x_val=x[:classes], y_val=y[:classes],
        batch_size=config.data.batch_size,
        class_names=[f"class_{i}" for i in range(classes)],
    )


def _non_finite_message(error, output_dir):
    state = read_state(output_dir)
    if state is None or not state.get("path"):
        kept = "No epoch had finished, so there is no checkpoint."
    else:
        kept = (f"The last good checkpoint (after epoch {state['epochs_done']}) "
                f"is kept: {state['path']}.")
    return f"{error}. {kept} history.csv holds the epochs before it."


def build_model(config, num_classes, input_shape, load_weights=True):
    """The model a recipe's `model:` (and `lora:` / `prompt_tuning:`)
    describe: a kft image classifier, or a keras-hub text classifier."""
    model_config = config.model
    if model_config.text is None:
        return build_classifier(
            model_config.backbone, num_classes,
            weights=model_config.weights, input_shape=input_shape,
            head=model_config.head, bn=model_config.bn,
            **model_config.backbone_kwargs)
    from kft.lora import apply_lora
    from kft.text import build_text_classifier
    from kft.text import prompt_tune_classifier

    try:
        model = build_text_classifier(
            model_config.text, num_classes,
            sequence_length=model_config.sequence_length,
            load_weights=load_weights)
    except (RuntimeError, ValueError) as error:
        raise RecipeError(f"model.text: {error}") from None
    if config.prompt_tuning is not None:
        prompt = config.prompt_tuning
        try:
            model = prompt_tune_classifier(model, prompt.num_virtual_tokens,
                                           prompt.init_text)
        except ValueError as error:
            raise RecipeError(f"prompt_tuning: {error}") from None
    if config.lora is not None:
        lora = config.lora
        try:
            apply_lora(model, targets=tuple(lora.targets), rank=lora.rank,
                       alpha=lora.alpha, dropout=lora.dropout,
                       use_rslora=lora.use_rslora,
                       trainable=tuple(lora.trainable))
        except ValueError as error:
            raise RecipeError(f"lora.targets: {error}") from None
    return model


def _save_adapter(model, output_dir):
    """Writes `adapter.npz` (the LoRA weights alone) and describes it."""
    from kft.lora import lora_layers
    from kft.lora import save_adapter

    path = save_adapter(model, os.path.join(output_dir, "adapter.npz"))
    return {"file": "adapter.npz", "bytes": os.path.getsize(path),
            "layers": len(lora_layers(model))}


def _prepare_output_dir(output_dir, resume, overwrite):
    if resume:
        if read_state(output_dir) is None:
            raise RecipeError(
                f"--resume: {output_dir!r} holds no checkpoint to resume "
                "from (checkpoints/state.json)."
            )
        return
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        if not overwrite:
            raise RecipeError(
                f"Output directory {output_dir!r} exists and is not empty. "
                "Pass --overwrite to replace it, --resume to continue its "
                "run, or another --output-dir."
            )
        shutil.rmtree(output_dir)


def _median_step_seconds(rows):
    """Median seconds per training step, leaving out each stage's first
    epoch (it traces the train step) where the stage has more."""
    times = []
    for stage in dict.fromkeys(r["stage"] for r in rows):
        stage_rows = [r for r in rows if r["stage"] == stage and "step_seconds" in r]
        times.extend(r["step_seconds"] for r in stage_rows[1:] or stage_rows)
    return round(float(np.median(times)), 5) if times else None


def _stage_summaries(rows, histories, config):
    summaries = []
    for stage in config.stages:
        stage_rows = [r for r in rows if r["stage"] == stage.name]
        if not stage_rows:
            continue
        last = stage_rows[-1]
        history = next((h for h in histories if h.stage == stage.name), None)
        summaries.append({
            "name": stage.name,
            "epochs": len(stage_rows),
            "seconds": round(sum(r.get("seconds", 0.0) for r in stage_rows), 2),
            "trainable_params": int(last.get("trainable_params", 0)),
            "lr_found": getattr(history, "lr_found", None),
            "final": {k: v for k, v in last.items()
                      if k not in ("stage", "epoch", "seconds", "trainable_params",
                                   "step_seconds")},
        })
    return summaries


def run_recipe(config, output_dir=None, verbose="auto", *, resume=False,
               smoke=False, overwrite=False):
    """Runs a validated `RecipeConfig` and writes its run directory.

    Args:
        config: a `RecipeConfig`.
        output_dir: the run directory (default `runs/<name>-<time>`).
        verbose: Keras verbosity; 0 is silent.
        resume: continue the interrupted run in `output_dir` from its last
            checkpoint (same recipe required).
        smoke: check the wiring in seconds: random weights, synthetic
            data of the recipe's shapes, two steps per stage.
        overwrite: replace an existing non-empty `output_dir`.

    Returns:
        `(output_dir, metrics)` where `metrics` is what `metrics.json` holds.
    """
    import keras

    started = time.perf_counter()
    if smoke:
        config = smoke_config(config)
        output_dir = output_dir or tempfile.mkdtemp(prefix=f"kft-smoke-{config.name}-")
    output_dir = output_dir or default_output_dir(config)
    _prepare_output_dir(output_dir, resume, overwrite)
    recipe_hash = config_hash(config)
    state = None
    if resume:
        with open(os.path.join(output_dir, "config.yaml")) as f:
            saved = yaml.safe_load(f)
        if saved.get("recipe_hash") != recipe_hash:
            raise RecipeError(
                f"--resume: the recipe differs from the one the run in "
                f"{output_dir!r} started with (see its config.yaml). Resume "
                "with the same recipe and overrides."
            )
        state = read_state(output_dir)
        history_path = os.path.join(output_dir, "history.csv")
        write_history(history_path, [
            r for r in read_history(history_path)
            if r["epoch"] <= state["epochs_done"]])
    os.makedirs(os.path.join(output_dir, "plots"), exist_ok=True)
    if not resume:
        # The resolved config first: even a run that fails says what it was.
        written = resolved(config)
        written["recipe_hash"] = recipe_hash
        with open(os.path.join(output_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(written, f, sort_keys=False)

    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(config.precision)
    try:
        keras.utils.set_random_seed(config.seed)
        if config.deterministic:
            import tensorflow as tf

            # Process-wide: same seed, same numbers (some GPU ops get slower).
            tf.config.experimental.enable_op_determinism()
        input_shape = _input_shape(config)
        bundle = (synthetic_data(config, input_shape) if smoke
                  else build_data(config.data, input_shape))
        if config.augmentation is not None:
            bundle.train = augment_training_data(
                bundle.train, config.augmentation, config.seed)
        data_seconds = time.perf_counter() - started

        strategy = make_strategy(config.distribution.strategy,
                                 config.distribution.devices)
        if state is not None:
            with strategy.scope():
                model = keras.saving.load_model(state["path"])
            resume_from = (state["stage"], state["stage_start"], state["epochs_done"])
            if verbose != 0:
                print(f"Resuming {output_dir} after epoch {state['epochs_done']} "
                      f"(stage {state['stage'] + 1})")
        else:
            # Built in the strategy's scope: variables are mirrored.
            with strategy.scope():
                model = build_model(config, bundle.num_classes, input_shape,
                                    load_weights=not smoke)
            resume_from = None
        if verbose != 0:
            print(f"Run directory: {output_dir}")
            print(format_trainable_summary(model))

        # The NaN guard first: a broken epoch never reaches the checkpoint.
        callbacks = [StopOnNonFiniteLoss(),
                     RunCheckpoint(output_dir, config.callbacks.checkpoints)]
        if config.callbacks.tensorboard:
            callbacks.append(keras.callbacks.TensorBoard(
                os.path.join(output_dir, "tensorboard")))
        histories = []
        if resume_from is None or resume_from[0] < len(config.stages):
            try:
                histories = fine_tune(
                    model, bundle.train, bundle.val, stages=config.stages,
                    callbacks=callbacks, verbose=verbose, resume_from=resume_from,
                    strategy=(None if config.distribution.strategy == "none"
                              else strategy),
                )
            except NonFiniteLoss as error:
                raise RuntimeError(_non_finite_message(error, output_dir)) from None

        model.save(os.path.join(output_dir, "model.keras"))
        adapter = None
        if config.lora is not None:
            adapter = _save_adapter(model, output_dir)
        rows = read_history(os.path.join(output_dir, "history.csv"))
        report.plot_curves(rows, os.path.join(output_dir, "plots", "curves.png"))

        eval_data = bundle.val if bundle.val is not None else bundle.train
        evaluation = evaluate(model, eval_data, bundle.class_names, output_dir)
    finally:
        keras.config.set_dtype_policy(previous_policy)

    metrics = {
        "recipe": config.name,
        "recipe_hash": recipe_hash,
        "seed": config.seed,
        "smoke": smoke,
        "classes": bundle.class_names,
        "final": {
            "train": {k: v for k, v in rows[-1].items()
                      if k in ("loss", "accuracy", "mae", "auc")} if rows else {},
            ("val" if bundle.val is not None else "train_eval"): evaluation,
        },
        "data": {"skipped_files": bundle.skipped_files},
        "distribution": {"strategy": config.distribution.strategy,
                         "replicas": int(strategy.num_replicas_in_sync)},
        "stages": _stage_summaries(rows, histories, config),
        **({"adapter": adapter} if adapter else {}),
        "params": {
            "total": int(sum(np.prod(w.shape) for w in model.weights)),
            "trainable": int(sum(np.prod(w.shape)
                                 for w in model.trainable_weights)),
        },
        "timings": {
            "median_step_seconds": _median_step_seconds(rows),
            "data_seconds": round(data_seconds, 2),
            "train_seconds": round(sum(r.get("seconds", 0.0) for r in rows), 2),
            "total_seconds": round(time.perf_counter() - started, 2),
        },
        "versions": report.versions(),
    }
    report.write_metrics(os.path.join(output_dir, "metrics.json"), metrics)
    return output_dir, metrics


def evaluate(model, data, class_names, output_dir, prefix=""):
    """Metrics, and for classifiers the confusion matrix (with its plot)
    and a per-class report, on `data`."""
    evaluation = model.evaluate(data, return_dict=True, verbose=0)
    evaluation = {k: float(v) for k, v in evaluation.items()}
    kind = head_kind(model)
    if kind in ("multiclass", "binary"):
        classes = class_names if kind == "multiclass" else class_names[:2]
        matrix = report.confusion_matrix(model, data, len(classes))
        report.plot_confusion_matrix(
            matrix, classes,
            os.path.join(output_dir, "plots", f"{prefix}confusion_matrix.png"),
        )
        evaluation["confusion_matrix"] = matrix.tolist()
        evaluation["per_class"] = report.classification_report(matrix, classes)
    return evaluation
