"""Data, models and pictures of detection and segmentation recipes
(`vision:`), for `kft.recipes.tasks.vision`."""

import json
import os
import re

import numpy as np

from kft.recipes.errors import RecipeError

__all__ = ["class_names", "plot_predictions", "vision_data", "vision_model"]

DEFAULT_IMAGE_SIZE = (256, 256)
_SMOKE_SCENES = (16, 8)


def image_size(config):
    """`model.image_size`, or 256 x 256."""
    return tuple(config.model.image_size or DEFAULT_IMAGE_SIZE)


def class_names(config):
    """The recipe's classes, known before any image is read (the model is
    built first). Segmentation: background first."""
    vision, data = config.vision, config.data
    if data.source == "fashion_scenes":
        from kft.vision.synthetic import FASHION_CLASSES

        names = list(FASHION_CLASSES)
        return ["background", *names] if vision.task == "segment" else names
    if data.source == "coco":
        try:
            with open(data.path, encoding="utf-8") as file:
                categories = json.load(file)["categories"]
            return [str(c.get("name", c["id"]))
                    for c in sorted(categories, key=lambda c: c["id"])]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise RecipeError(f"data.path: {data.path!r} is not a readable "
                              f"COCO file ({error})") from None
    return list(vision.class_names)


def _split(items, config):
    """`(train, val)`: a seeded shuffle, `data.validation_split` held out."""
    order = np.random.default_rng(config.seed).permutation(len(items))
    count = int(round(len(items) * config.data.validation_split))
    if config.data.validation_split and len(items) > 1:
        count = min(max(count, 1), len(items) - 1)
    return [items[i] for i in order[count:]], [items[i] for i in order[:count]]


def _read(config):
    """`(items, messages)` from the annotation files of `data.source`."""
    from kft.vision import annotations

    data, vision = config.data, config.vision
    try:
        if data.source == "coco":
            items, _, report = annotations.read_coco(data.path, data.data_dir)
        elif data.source == "voc":
            items, report = annotations.read_voc(data.path, data.data_dir,
                                                 vision.class_names)
        elif data.source == "yolo":
            items, report = annotations.read_yolo(data.data_dir, data.path,
                                                  len(vision.class_names))
        else:
            items, report = annotations.read_masks(
                data.data_dir, data.path, len(vision.class_names))
    except (OSError, annotations.AnnotationError) as error:
        raise RecipeError(f"data: {error}") from None
    if not items:
        raise RecipeError(f"data: no usable images in {data.path!r} "
                          f"({report.summary()}): {report.messages[:3]}")
    return items, report.messages


def _scenes(config, smoke):
    from kft.vision.synthetic import fashion_scenes

    scenes = config.vision.scenes
    train_count, val_count = _SMOKE_SCENES if smoke else (scenes.train, scenes.val)
    size = max(image_size(config))
    common = {"image_size": size, "objects": scenes.objects, "scale": scenes.scale}
    try:
        return (fashion_scenes(train_count, split="train", seed=config.seed,
                               **common),
                fashion_scenes(val_count, split="val", seed=config.seed + 1,
                               **common))
    except (FileNotFoundError, RuntimeError) as error:
        raise RecipeError(f"data.source 'fashion_scenes': {error}") from None


def vision_data(config, smoke=False):
    """The recipe's `kft.data.DataBundle`: training batches augmented as
    `vision.augment` says, validation batches in a fixed order."""
    from kft.data import DataBundle
    from kft.vision import BoxAugmentation
    from kft.vision import detection_dataset
    from kft.vision import segmentation_dataset

    vision, data = config.vision, config.data
    make = detection_dataset if vision.task == "detect" else segmentation_dataset
    size = image_size(config)
    messages = []
    if data.source == "fashion_scenes":
        train, val = _scenes(config, smoke)
    else:
        items, messages = _read(config)
        train, val = _split(items[:_SMOKE_SCENES[0]] if smoke else items, config)
    augment = (BoxAugmentation(**vision.augment.model_dump(), seed=config.seed)
               if vision.augment is not None else None)
    train_data = make(train, image_size=size, batch_size=data.batch_size,
                      augment=augment, shuffle=data.shuffle, seed=config.seed)
    val_data = (make(val, image_size=size, batch_size=data.batch_size,
                     shuffle=False) if len(val) else None)
    return DataBundle(train_data, val_data, class_names(config), (*size, 3),
                      skipped_files=messages)


def vision_model(config, load_weights):
    """The detector or segmenter of the recipe, LoRA applied if asked."""
    from kft.vision import build_detector
    from kft.vision import build_segmenter

    model_config, vision = config.model, config.vision
    weights = load_weights and model_config.weights is not None
    common = {"weights": weights, "image_size": image_size(config),
              "bn": model_config.bn}
    names = class_names(config)
    try:
        if vision.task == "detect":
            model = build_detector(
                model_config.preset, len(names), levels=vision.levels,
                head_conv_layers=vision.head_conv_layers,
                anchor_size=vision.anchor_size, **common)
        else:
            model = build_segmenter(model_config.preset, len(names),
                                    pooling_level=vision.pooling_level, **common)
    except ValueError as error:
        raise RecipeError(f"model.preset: {error}") from None
    if config.lora is not None:
        _apply_lora(model, config.lora)
    return model


def _apply_lora(model, lora):
    """LoRA on the encoder; the pyramid / decoder and heads keep training
    (kft's `head_layers`), with what `lora.trainable` names."""
    from kft.backbones.anatomy import head_layers
    from kft.lora import apply_lora

    head = [f"^{re.escape(layer.name)}$" for layer in head_layers(model)]
    settings = lora.model_dump(include={"targets", "rank", "alpha", "dropout"})
    try:
        apply_lora(model, **settings, trainable=[*lora.trainable, *head])
    except ValueError as error:
        raise RecipeError(f"lora: {error}") from None


def plot_predictions(model, data, task, path, count=4):
    """Draws predicted boxes / masks beside the ground truth on the first
    `count` validation images (a PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kft.vision.metrics import predict_padded

    images, truth = next(iter(data))
    images = np.asarray(images)
    # One batch of the data's own size: the predict function keeps a
    # static batch size (see predict_padded).
    predicted = predict_padded(model, images, len(images))
    images = images[:count].astype("uint8")
    figure, axes = plt.subplots(len(images), 2, figsize=(6, 3 * len(images)),
                                squeeze=False)
    for row, image in enumerate(images):
        for column, title in enumerate(("ground truth", "predicted")):
            axis = axes[row, column]
            axis.imshow(image)
            axis.set_title(title, fontsize=8)
            axis.axis("off")
            if task == "segment":
                mask = (np.asarray(truth)[row, ..., 0] if column == 0
                        else np.asarray(predicted)[row].argmax(-1))
                axis.imshow(np.ma.masked_equal(mask, 0), alpha=0.5,
                            cmap="tab20", vmin=0, vmax=20)
                continue
            source = truth if column == 0 else predicted
            _draw_boxes(axis, source, row, column == 1, image.shape[:2])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def _draw_boxes(axis, source, row, predicted, size, threshold=0.3):
    import matplotlib.patches as patches

    # An untrained head decodes to boxes far outside (or inf / NaN).
    boxes = np.nan_to_num(np.asarray(source["boxes"])[row], nan=-1.0)
    boxes = np.clip(boxes, 0, [size[0], size[1], size[0], size[1]])
    labels = np.asarray(source["labels"])[row]
    scores = (np.asarray(source["confidence"])[row] if predicted
              else np.ones(len(labels)))
    for (y1, x1, y2, x2), label, score in zip(boxes, labels, scores):
        if label < 0 or score < threshold or y2 <= y1 or x2 <= x1:
            continue
        axis.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False,
                                         color="red" if predicted else "lime"))
        axis.text(x1, y1, f"{int(label)}" + (f" {score:.2f}" if predicted else ""),
                  color="white", fontsize=6, backgroundcolor="black")
