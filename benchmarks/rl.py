"""GRPO on SmolLM2-135M-Instruct: where a step's time goes, and rollout
speed against plain keras-hub `generate`.

The model is a converted SmolLM2-135M-Instruct
(`~/.cache/kft/assets/smollm2_135m_instruct`, `kft.build_causal_lm`), LoRA
rank 16 on every linear layer. Prompts are two-digit additions rendered
with the chat template (`kft.rl.arithmetic_prompts`), `--prompts` per
step, each with G = `--generations` completions of exactly
`--new-tokens` tokens (no stop token, so both sides generate the same
number of tokens).

1. Per-step split (`kft.rl.RLCausalLM` with `beta` 0.04 and
   `num_iterations` 2: the reference pass with the adapters off and the
   sampling policy's log-probabilities both run): generation, log-probs
   (one compiled pass, policy + reference), update (two optimizer steps),
   medians over the steps after the first (which traces and compiles).
2. Rollout tokens/s: kft's `RolloutGenerator` on the LoRA model (adapters
   not merged) against `lm.generate` of keras-hub on the same model
   before LoRA was applied, same prompts, same `max_length`, same sampler
   (random, temperature 1); each timed on its second call (the first
   compiles). Goal: kft / keras-hub >= 0.9.

    nice python benchmarks/rl.py [--prompts 2] [--generations 8]
        [--new-tokens 64] [--steps 4] [--model DIR]
"""

import argparse
import os
import statistics
import time

MODEL = os.path.expanduser("~/.cache/kft/assets/smollm2_135m_instruct")
_START = time.perf_counter()


def log(message):
    print(f"[{time.perf_counter() - _START:6.0f}s] {message}", flush=True)


def _prompts(lm, count):
    from kft.rl import arithmetic_prompts
    from kft.rl import render_prompts

    return [r["prompt"] for r in render_prompts(lm, arithmetic_prompts(count))]


def plain_generate(lm, prompts, args, max_length):
    """Tokens/s of keras-hub's own `generate` (seconds of the second call)."""
    import keras_hub

    lm.compile(sampler=keras_hub.samplers.RandomSampler(temperature=1.0, seed=0))
    rows = [p for p in prompts for _ in range(args.generations)]
    times = []
    for _ in range(2):
        start = time.perf_counter()
        lm.generate(rows, max_length=max_length, stop_token_ids=None)
        times.append(time.perf_counter() - start)
    tokens = len(rows) * args.new_tokens
    log(f"keras-hub generate: {times[0]:.1f} s (compiles), then {times[1]:.2f} s "
        f"= {tokens / times[1]:.1f} new tokens/s")
    return tokens / times[1]


def kft_rollouts(model, prompts, args):
    generator = model.generator()
    times = []
    for step in range(2):
        start = time.perf_counter()
        rollouts = generator.generate(prompts, step=step)
        times.append(time.perf_counter() - start)
    tokens = int(rollouts.completion_mask.sum())
    log(f"kft rollouts: {times[0]:.1f} s (compiles), then {times[1]:.2f} s = "
        f"{tokens / times[1]:.1f} new tokens/s ({tokens} tokens)")
    return tokens / times[1]


def step_split(model, prompts, args):
    from kft.rl.trainer import rl_step

    records = [{"prompt": p} for p in prompts]
    rows = []
    for step in range(args.steps):
        logs, _ = rl_step(model, records, step)
        rows.append(logs)
        log(f"step {step}: generation {logs['generation_seconds']:.2f} s, "
            f"log-probs {logs['logps_seconds']:.2f} s, update "
            f"{logs['update_seconds']:.2f} s")
    later = rows[1:] or rows
    return {key: statistics.median(r[key] for r in later)
            for key in ("generation_seconds", "logps_seconds", "update_seconds")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    import keras

    import kft
    from kft.lora import apply_lora
    from kft.rl import RLCausalLM
    from kft.rl import RolloutConfig

    lm = kft.build_causal_lm(args.model)
    prompts = _prompts(lm, args.prompts)
    rollout = RolloutConfig(num_generations=args.generations,
                            max_new_tokens=args.new_tokens, max_prompt_length=64,
                            stop_token_ids=None)
    plain = plain_generate(lm, prompts, args, rollout.sequence_length)
    apply_lora(lm, targets="all-linear", rank=16, alpha=32)
    model = RLCausalLM(lm, [lambda p, c, **k: [float(len(x) % 2) for x in c]],
                       rollout=rollout, beta=0.04, num_iterations=2)
    model.compile(optimizer=keras.optimizers.Adam(1e-5))
    ours = kft_rollouts(model, prompts, args)
    split = step_split(model, prompts, args)
    total = sum(split.values())
    rows = args.prompts * args.generations
    print(f"\nSmolLM2-135M, LoRA r16 all-linear, {args.prompts} prompts x G="
          f"{args.generations} = {rows} completions of {args.new_tokens} tokens, "
          f"{keras.backend.backend()}, device: {_device()}")
    print("| part | median s/step | share |\n| --- | --- | --- |")
    for key, value in split.items():
        print(f"| {key.replace('_seconds', '')} | {value:.2f} | "
              f"{value / total:.0%} |")
    print(f"\nrollout tokens/s: kft {ours:.1f}, keras-hub generate {plain:.1f}, "
          f"ratio {ours / plain:.2f} (goal >= 0.9)")


def _device():
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return gpus[0].name if gpus else f"CPU ({os.cpu_count()} cores)"


if __name__ == "__main__":
    main()
