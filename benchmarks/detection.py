"""Detection and segmentation fine-tuning: pretrained Lite0 against scratch.

The task is kft's offline one (`kft.vision.synthetic.fashion_scenes`):
Fashion-MNIST garments on crops of real photographs, validation on
held-out photos and Fashion-MNIST's test garments. Each method trains the
same architecture for the same number of epochs:

    scratch   random encoder (weights=False, bn="train"), everything trains
    head      ImageNet Lite0 frozen; pyramid / decoder and heads train
    gradual   head first, then 6, 12, all encoder blocks (GradualUnfreezing)
    full      one head epoch, then everything at a lower rate
    lora      LoRA rank 8 on the encoder's 1x1 convolutions + the heads

Detection: COCO mAP@.5 and mAP@[.5:.95] (pycocotools). Segmentation:
mean IoU over the 11 classes (background included). Also: the head-only
step against the full step, and the input pipeline's images/s with and
without augmentation against the training step rate.

    python benchmarks/detection.py --task detect --seeds 0 1 2
    python benchmarks/detection.py --task segment --methods scratch full
    python benchmarks/detection.py --speed

Needs `kft convert efficientnet-lite0`, `apt-get install
dataset-fashion-mnist lomiri-wallpapers-20.04`, `pip install pycocotools`.
"""

import argparse
import json
import re
import time

import keras
import numpy as np

import kft
from kft.vision import BoxAugmentation
from kft.vision import build_detector
from kft.vision import build_segmenter
from kft.vision import synthetic
from kft.vision.data import detection_dataset
from kft.vision.data import segmentation_dataset
from kft.vision.metrics import coco_map
from kft.vision.metrics import mean_iou
from kft.vision.metrics import predict_detections

LITE0 = "efficientnet_lite0_imagenet"
POINTWISE = r"block\d+[a-z]_(expand_conv|project)"
METHODS = ("scratch", "head", "gradual", "full", "lora")


def build(task, method, size):
    kwargs = {"weights": method != "scratch",
              "bn": "train" if method == "scratch" else "frozen",
              "image_size": (size, size)}
    if task == "detect":
        return build_detector(LITE0, 10, levels=(3, 6), head_conv_layers=2,
                              **kwargs)
    return build_segmenter(LITE0, 11, **kwargs)


def stages(method, epochs, model):
    if method == "scratch":
        return [{"name": "all", "trainable": "all", "epochs": epochs,
                 "learning_rate": 1e-3, "schedule": "cosine"}]
    if method == "head":
        return [{"name": "head", "epochs": epochs, "learning_rate": 1e-3,
                 "schedule": "cosine"}]
    if method == "gradual":
        return [{"name": "gradual", "epochs": epochs, "learning_rate": 5e-4,
                 "unfreeze": {"schedule": {1: 6, 2: 12, 3: "all"}}}]
    if method == "full":
        return [{"name": "head", "epochs": 1, "learning_rate": 1e-3},
                {"name": "full", "trainable": "all", "epochs": epochs - 1,
                 "learning_rate": 3e-4, "schedule": "cosine"}]
    head = [layer.name for layer in kft.anatomy.head_layers(model)]
    kft.lora.apply_lora(model, targets=[POINTWISE], rank=8, alpha=16,
                        trainable=[f"^{re.escape(n)}$" for n in head])
    return [{"name": "lora", "trainable": "keep", "epochs": epochs,
             "learning_rate": 1e-3, "schedule": "cosine"}]


def datasets(task, args, seed):
    train = synthetic.fashion_scenes(args.train, image_size=args.size, seed=seed)
    val = synthetic.fashion_scenes(args.val, split="val", image_size=args.size,
                                   seed=1000 + seed)
    augment = BoxAugmentation(horizontal_flip=True, zoom_range=0.1, seed=seed)
    make = detection_dataset if task == "detect" else segmentation_dataset
    size = (args.size, args.size)
    return (make(train, image_size=size, batch_size=args.batch, augment=augment,
                 seed=seed),
            make(val, image_size=size, batch_size=args.batch, shuffle=False),
            val)


def evaluate(task, model, val_data, val):
    if task == "detect":
        truth, found = predict_detections(model, val_data)
        scores = coco_map(truth, found, 10)
        return {"map50": scores["map50"], "map": scores["map"]}
    logits = model.predict(val_data.map(lambda x, _: x), verbose=0)
    return {"miou": mean_iou(val["masks"], logits, 11)}


def run(task, method, seed, args):
    keras.utils.set_random_seed(seed)
    train, val_data, val = datasets(task, args, seed)
    model = build(task, method, args.size)
    plan = stages(method, args.epochs, model)
    start = time.perf_counter()
    kft.fine_tune(model, train, stages=plan, verbose=0)
    seconds = time.perf_counter() - start
    result = {"task": task, "method": method, "seed": seed,
              "train_seconds": round(seconds, 1), **evaluate(task, model,
                                                             val_data, val)}
    print(json.dumps(result), flush=True)
    return result


def _step_seconds(model, data, steps=6):
    if not getattr(model, "_benchmark_warm", False):  # compile and trace once
        model.compile(optimizer=keras.optimizers.Adam(1e-4))
        model.fit(data.take(1), epochs=1, verbose=0)
        model._benchmark_warm = True
    start = time.perf_counter()
    model.fit(data.take(steps), epochs=1, verbose=0)
    return (time.perf_counter() - start) / steps


def _pipeline_images_per_second(data, batch, steps=20):
    iterator = iter(data.repeat())
    next(iterator)
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    return steps * batch / (time.perf_counter() - start)


def speed(args):
    """Head-only step against the full step; pipeline against training."""
    scenes = synthetic.fashion_scenes(128, image_size=args.size, seed=0)
    size, batch = (args.size, args.size), args.batch
    plain = detection_dataset(scenes, image_size=size, batch_size=batch)
    augmented = detection_dataset(scenes, image_size=size, batch_size=batch,
                                  augment=BoxAugmentation(zoom_range=0.1))
    rows, models = {}, {}
    for trainable in ("head", "all"):
        models[trainable] = build("detect", "head", args.size)
        kft.backbones.freezing.set_trainable(models[trainable], trainable)
    # Interleaved, best of three: the shared machine's load drifts.
    for trainable in ("head", "all") * 3:
        seconds = _step_seconds(models[trainable], plain)
        key = f"{trainable}_step_s"
        rows[key] = round(min(rows.get(key, seconds), seconds), 3)
    rows["head_over_full"] = round(rows["head_step_s"] / rows["all_step_s"], 2)
    rows["train_images_per_s_full"] = round(batch / rows["all_step_s"], 1)
    rows["pipeline_images_per_s"] = round(
        _pipeline_images_per_second(plain, batch), 1)
    rows["pipeline_images_per_s_augmented"] = round(
        _pipeline_images_per_second(augmented, batch), 1)
    print(json.dumps(rows), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("detect", "segment"), default="detect")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--speed", action="store_true")
    args = parser.parse_args()
    if args.speed:
        return speed(args)
    results = [run(args.task, m, s, args) for m in args.methods for s in args.seeds]
    for method in args.methods:
        rows = [r for r in results if r["method"] == method]
        keys = [k for k in rows[0] if k in ("map50", "map", "miou")]
        print(method, {k: f"{np.mean([r[k] for r in rows]):.3f} "
                          f"± {np.std([r[k] for r in rows]):.3f}" for k in keys})


if __name__ == "__main__":
    main()
