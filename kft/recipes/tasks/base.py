"""`Task`: what one kind of run does, and the registry of kinds.

The runner (`kft run`), `kft eval`, `kft export`, `kft generate` and `kft
compare` never branch on which model a recipe names: they look its task up
(`task_for(config)`) and call it. A new kind of run is a `Task` subclass
and one `register_task` call, in kft or in a user's own module; a recipe
picks it with `task: NAME`, or a built-in task claims the recipe by its
`model:` section (`Task.matches`). An installed package can add tasks
through the `kft.tasks` entry-point group (`NAME = "module:TaskClass"`), so
that every process, `kft compare`'s runs included, knows them.
"""

import difflib
import importlib
import importlib.metadata
import os

from kft.recipes.errors import RecipeError

__all__ = ["ENTRY_POINT_GROUP", "Task", "get_task", "register_task", "registered_tasks",
           "task_for", "unregister_task"]

# The built-in tasks, in the order they claim a recipe that names no
# `task:`. Imported when first used: the registry's names are known
# without loading Keras (`kft validate` stays light).
_BUILTIN = {
    # Before causal_lm_sft, which would claim an `rl:` recipe's causal LM.
    "causal_lm_rl": "kft.recipes.tasks.rl:RLTuning",
    "causal_lm_sft": "kft.recipes.tasks.causal_lm:CausalLMSFT",
    "audio_classification": "kft.recipes.tasks.classification:AudioClassification",
    "text_classification": "kft.recipes.tasks.classification:TextClassification",
    # Before image_classification, which would claim a vision: recipe's preset.
    "object_detection": "kft.recipes.tasks.vision:ObjectDetection",
    "semantic_segmentation": "kft.recipes.tasks.vision:SemanticSegmentation",
    "image_classification": "kft.recipes.tasks.classification:ImageClassification",
    "causal_lm_preference": "kft.recipes.tasks.preference:PreferenceTuning",
}
_TASKS = dict(_BUILTIN)  # name -> Task, or the "module:Class" to import
# Installed packages add tasks under this entry-point group (name = the
# task's name, value = "module:TaskClass"), found without importing them.
ENTRY_POINT_GROUP = "kft.tasks"


def _discover_plugins():
    """Adds the tasks installed packages declare (`kft.tasks` entry
    points) that are not registered yet."""
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        _TASKS.setdefault(entry.name, entry.value)


class Task:
    """One kind of recipe run: how it builds data and model, evaluates,
    exports and compares methods.

    Subclasses set `name` and override what differs from a classifier's
    defaults below. Each method gets the validated `RecipeConfig`; the
    runner's phases get the `RecipeRun` itself (`run.config`, `run.bundle`,
    `run.model`, `run.path(...)`, `run.metrics(rows, evaluation)`).

    Example:

    ```python
    class Regression(kft.recipes.Task):
        name = "toy_regression"

        def build_data(self, config, input_shape, smoke):
            ...  # a kft.data.DataBundle

        def build_model(self, config, bundle, input_shape, load_weights):
            ...  # a compiled-later keras.Model

    kft.recipes.register_task(Regression())
    # recipe: task: toy_regression
    ```
    """

    name = ""
    #: Methods of this task's own that `kft compare` accepts beside
    #: `kft.recipes.methods.METHODS` (a preference task: its losses).
    methods = ()
    #: What `kft compare` runs when no `--methods` are given.
    default_methods = ("head", "full", "gradual", "discriminative")

    def matches(self, config):
        """Whether this task runs a recipe that names no `task:`."""
        return False

    # === Run ===

    def input_shape(self, config):
        """The shape of one input example (`()` for strings)."""
        return ()

    def smoke_config(self, config):
        """The recipe for `--smoke` (random weights by default)."""
        model = config.model.model_copy(update={"weights": None})
        return config.model_copy(update={"model": model})

    def build_data(self, config, input_shape, smoke):
        """The run's `kft.data.DataBundle`, or `None` when it needs the
        model first (then `setup_after_model` builds it)."""
        raise NotImplementedError

    def build_model(self, config, bundle, input_shape, load_weights):
        """The Keras model the stages train. `load_weights=False`: random
        weights (a smoke run, or a resume that loads its checkpoint)."""
        raise NotImplementedError

    def loss_and_metrics(self, config, model):
        """`(loss, metrics)` for the stages to compile with, or `None`:
        `fine_tune` derives them from the model's head."""
        return None

    def setup_after_model(self, run):
        """Anything that needs the built model (e.g. its tokenizer)."""

    def finalize(self, run):
        """Saves the trained model (`model.keras`, and `adapter.npz` with
        `lora:`), evaluates it and returns the `metrics.json` dict."""
        from kft.recipes.checkpoint import read_history
        from kft.training import report

        run.model.save(run.path("model.keras"))
        adapter = run.save_adapter() if run.config.lora is not None else None
        rows = read_history(run.path("history.csv"))
        report.plot_curves(rows, run.path("plots", "curves.png"))
        bundle = run.bundle
        data = bundle.val if bundle.val is not None else bundle.train
        metrics = run.metrics(rows, self.evaluate(
            run.model, data, bundle.class_names, run.write_dir))
        if adapter:
            metrics["adapter"] = adapter
        return metrics

    def evaluate(self, model, data, class_names, output_dir, prefix=""):
        """The model's compiled metrics on `data`, as floats."""
        result = model.evaluate(data, return_dict=True, verbose=0)
        return {key: float(value) for key, value in result.items()}

    # === A finished run ===

    def load_run(self, run_dir, config):
        """The trained model of a finished run directory."""
        import keras

        path = os.path.join(run_dir, "model.keras")
        if not os.path.exists(path):
            raise RecipeError(
                f"{run_dir!r} is not a finished kft run (no model.keras).")
        # safe_mode: a Lambda's bytecode or an arbitrary callable in the
        # file's config is refused, never run.
        return keras.saving.load_model(path, safe_mode=True)

    def evaluate_run(self, run_dir, config, model, data_path=None):
        """Metrics of a finished run on `data_path` (default: the recipe's
        validation data), for `kft eval`."""
        input_shape = self.eval_input_shape(config, model)
        bundle = (self.data_from_path(data_path, config, input_shape)
                  if data_path else self.build_data(config, input_shape, False))
        data = bundle.val if bundle.val is not None else bundle.train
        return self.evaluate(model, data, bundle.class_names, run_dir,
                             prefix="eval_")

    def eval_input_shape(self, config, model):
        """The example shape `kft eval` builds data for."""
        return tuple(model.input_shape[1:])

    def data_from_path(self, path, config, input_shape):
        """A `DataBundle` (held-out part in `val`) from `kft eval --data`."""
        raise RecipeError(f"--data: runs of task {self.name!r} evaluate on "
                          "their recipe's own data only")

    def export_run(self, run_dir, config, model, format=None, merge=False,
                   output=None):
        """Writes the trained model as a `.keras` file (the default) or a TF
        SavedModel, LoRA adapters merged with `merge=True`; returns the
        path."""
        from kft.lora.base import lora_layers
        from kft.lora.model import merge_lora

        format = format or "keras"
        if format not in ("keras", "saved_model"):
            raise RecipeError("--format must be 'keras' or 'saved_model'. "
                              f"Received: {format!r}")
        if merge:
            if not lora_layers(model):
                raise RecipeError(
                    "--merge-lora: this model has no LoRA adapters to merge.")
            merge_lora(model)
        output = output or os.path.join(run_dir, "export")
        os.makedirs(output, exist_ok=True)
        if format == "keras":
            path = os.path.join(output, "model.keras")
            model.save(path)
            return path
        path = os.path.join(output, "saved_model")
        model.export(path, format="tf_saved_model", verbose=False)
        return path

    def generate(self, config, model, prompts, max_length):
        """Completions of `prompts` (`kft generate`)."""
        raise RecipeError(f"kft generate: a {self.name} run does not generate "
                          "text (model.causal_lm runs do).")

    # === kft compare ===

    def method_changes(self, method, epochs, base):
        """The recipe keys a `kft compare` method sets, as `(changes,
        reason)`: `changes` is `None` when the method does not apply, and
        `reason` says why. Default: the image-model methods."""
        from kft.recipes.methods import method_stages

        return method_stages(method, epochs, False)

    def method_description(self, method):
        """One line on what `method` trains, for `kft compare`'s report."""
        from kft.recipes.methods import DESCRIPTIONS

        return DESCRIPTIONS.get(method, "")


def register_task(task, *, override=False):
    """Adds `task` (a `Task` instance) to the kinds of run recipes can use.

    Raises:
        ValueError: `task` is not a `Task`, has no name, or its name is
            taken (unless `override=True`).
    """
    if not isinstance(task, Task):
        raise ValueError(f"register_task takes a kft.recipes.Task instance. "
                         f"Received: {task!r}")
    if not task.name or not task.name.isidentifier():
        raise ValueError(f"A task's name is an identifier (letters, digits, "
                         f"_). Received: name={task.name!r}")
    if task.name in _TASKS and not override:
        raise ValueError(f"A task named {task.name!r} is registered already; "
                         "pass override=True to replace it.")
    _TASKS[task.name] = task
    return task


def unregister_task(name):
    """Removes a registered task (e.g. a test's own); a built-in comes
    back as it was."""
    _TASKS.pop(name, None)
    if name in _BUILTIN:
        _TASKS[name] = _BUILTIN[name]


def registered_tasks():
    """The registered task names (built-ins first, then installed
    packages' `kft.tasks` entry points and `register_task` calls)."""
    _discover_plugins()
    return list(_TASKS)


def get_task(name, key="task"):
    """The registered task `name`; a `RecipeError` naming `key` and the
    registered names otherwise."""
    if name not in _TASKS:
        _discover_plugins()
    if name not in _TASKS:
        close = difflib.get_close_matches(str(name), list(_TASKS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"{key}: unknown task {name!r}; registered: "
                          f"{', '.join(_TASKS)}.{hint}")
    task = _TASKS[name]
    if isinstance(task, str):  # imported on first use
        module, _, cls = task.partition(":")
        task = getattr(importlib.import_module(module), cls)()
        if not isinstance(task, Task) or task.name != name:
            raise RecipeError(f"{key}: {_TASKS[name]!r}, registered as task "
                              f"{name!r}, is not a kft Task named {name!r}")
        _TASKS[name] = task
    return task


def task_for(config):
    """The task that runs `config`: its `task:` when given, else the first
    registered task whose `matches(config)` is true."""
    if config.task is not None:
        return get_task(config.task)
    for name in list(_TASKS):
        task = get_task(name)
        if task.matches(config):
            return task
    raise RecipeError("task: no registered task runs this recipe's model; "
                      f"name one of {', '.join(_TASKS)}")
