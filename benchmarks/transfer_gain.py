"""The quickstart recipe with its pretrained weights against `weights=None`.

Same recipe, data, stages, epochs and seed; only `model.weights` differs.
Prints the final validation accuracy of each for several seeds, their
means and the margin.

    python benchmarks/transfer_gain.py [--seeds 0,1,2]
"""

import argparse
import statistics
import tempfile

from kft.recipes import load_recipe
from kft.recipes.runner import run_recipe


def accuracy(weights, seed):
    overrides = [f"seed={seed}", f"model.weights={weights}"]
    config = load_recipe("quickstart", overrides)
    with tempfile.TemporaryDirectory() as out:
        _, metrics = run_recipe(config, out, verbose=0)
    return metrics["final"]["val"]["accuracy"], metrics["timings"]["train_seconds"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]

    results = {"fashion_mnist": [], "null": []}
    for seed in seeds:
        for weights in results:
            acc, seconds = accuracy(weights, seed)
            results[weights].append(acc)
            print(f"seed {seed} weights={weights:<14} val_accuracy {acc:.4f} "
                  f"({seconds:.0f} s training)")
    pre, scratch = (statistics.mean(results[k]) for k in ("fashion_mnist", "null"))
    print("\nquickstart recipe, 4 held-out Fashion-MNIST classes, 800 train / "
          "400 val images")
    print(f"{'pretrained (fashion_mnist)':<28} mean val_accuracy {pre:.4f}  "
          f"{[round(a, 4) for a in results['fashion_mnist']]}")
    print(f"{'from scratch (weights=None)':<28} mean val_accuracy {scratch:.4f}  "
          f"{[round(a, 4) for a in results['null']]}")
    print(f"margin {pre - scratch:+.4f} ({pre / scratch:.2f}x); pretrained wins on "
          f"{sum(a > b for a, b in zip(results['fashion_mnist'], results['null']))}"
          f"/{len(seeds)} seeds")


if __name__ == "__main__":
    main()
