"""Supervised fine-tuning of a causal LM (`model.causal_lm`): full, LoRA,
QLoRA or prompt tuning, on SFT records."""

import os

from kft.lora.io import load_adapter
from kft.lora.io import save_adapter
from kft.prompt.causal_lm import load_prompt
from kft.recipes import builders
from kft.recipes.causal import CAUSAL_METHODS
from kft.recipes.causal import evaluate_causal_run
from kft.recipes.causal import export_causal_run
from kft.recipes.causal import variable_bytes
from kft.recipes.causal import write_prompt
from kft.recipes.checkpoint import read_history
from kft.recipes.errors import RecipeError
from kft.recipes.methods import DEFAULT_CAUSAL_METHODS
from kft.recipes.methods import causal_method
from kft.recipes.schema import GenerateConfig
from kft.recipes.tasks.base import Task
from kft.training import report

__all__ = ["CausalLMSFT"]


class CausalLMSFT(Task):
    """A causal LM trained on SFT records, inside `kft.sft.SFTCausalLM`
    (or `PromptTunedCausalLM`): held-out NLL and perplexity, greedy samples
    before and after, adapters in kft's and PEFT's format."""

    name = "causal_lm_sft"
    default_methods = DEFAULT_CAUSAL_METHODS

    def matches(self, config):
        # A recipe with preference: is a preference run (tasks/preference.py).
        return config.model.causal_lm is not None and config.preference is None

    def smoke_config(self, config):
        return config  # the checkpoint is the model: kept

    def build_data(self, config, input_shape, smoke):
        return None  # SFT batches need the model's tokenizer

    def build_model(self, config, bundle, input_shape, load_weights):
        return builders.causal_model(config)

    def setup_after_model(self, run):
        """SFT data from the model's tokenizer, and the greedy samples and
        held-out loss before training."""
        config, lm = run.config, run.model.lm
        if run.smoke:
            config = config.model_copy(update={"data": config.data.model_copy(
                update={"max_examples": 8})})
        run.bundle = builders.sft_data(config, lm)
        run.data_ready()
        # The base model, before training (also when resuming: the model
        # is rebuilt from the recipe before the checkpoint is loaded).
        run.samples = {"before": builders.generate_samples(
            lm, run.config.generate)}
        if run.bundle.val is not None and not run.smoke:
            run.model.compile()  # SFT defaults: the loss fine_tune uses
            run.before = builders.evaluate_sft(run.model, run.bundle.val)

    def finalize(self, run):
        """Adapters (kft and PEFT format), the prompt or the weights,
        held-out NLL and perplexity, greedy samples before / after."""
        saved = self._save(run)
        rows = read_history(run.path("history.csv"))
        report.plot_curves(rows, run.path("plots", "curves.png"))
        evaluation = builders.evaluate_sft(run.model,
                                           run.bundle.val or run.bundle.train)
        prompted = run.config.prompt_tuning is not None
        run.samples["after"] = builders.generate_samples(
            run.model if prompted else run.model.lm, run.config.generate)
        if run.samples["after"]:
            report.write_metrics(run.path("samples.json"), run.samples)
        metrics = run.metrics(rows, evaluation)
        if run.before is not None:
            metrics["final"]["val_before"] = run.before
        metrics.update(saved, model_bytes=variable_bytes(run.model))
        return metrics

    def _save(self, run):
        lm = run.model.lm
        if run.config.prompt_tuning is not None:
            # The virtual tokens alone; the base is unchanged.
            return {"prompt": write_prompt(run.model, run.write_dir)}
        if run.config.lora is None:
            lm.save_weights(run.path("model.weights.h5"))
            return {"weights": "model.weights.h5"}
        saved = {"adapter": run.save_adapter()}
        try:
            save_adapter(lm, run.path("adapter_peft"), format="peft")
            saved["adapter_peft"] = "adapter_peft/"
        except ValueError as error:  # e.g. a family PEFT naming lacks
            saved["adapter_peft"] = f"not written: {error}"
        return saved

    def load_run(self, run_dir, config):
        """The base rebuilt from its recipe, then the adapters
        (`adapter.npz`), the virtual tokens (`prompt.npz`, in a
        `PromptTunedCausalLM`) or the trained weights (`model.weights.h5`)."""
        name = ("adapter.npz" if config.lora else "prompt.npz"
                if config.prompt_tuning else "model.weights.h5")
        path = os.path.join(run_dir, name)
        if not os.path.exists(path):
            raise RecipeError(f"{run_dir!r} is not a finished causal-LM run "
                              f"(no {name}).")
        model = builders.causal_model(config)
        if config.lora:
            load_adapter(model.lm, path)
        elif config.prompt_tuning:
            load_prompt(model, path)
        else:
            model.lm.load_weights(path)
        return model

    def evaluate_run(self, run_dir, config, model, data_path=None):
        return evaluate_causal_run(run_dir, config, model, data_path)

    def export_run(self, run_dir, config, model, format=None, merge=False,
                   output=None):
        return export_causal_run(config, model, output or os.path.join(
            run_dir, "export"), format)

    def generate(self, config, model, prompts, max_length):
        generate = GenerateConfig(prompts=list(prompts), max_length=max_length)
        # A prompt-tuned run completes through its virtual tokens.
        return builders.generate_samples(
            model if config.prompt_tuning else model.lm, generate)

    def method_changes(self, method, epochs, base):
        return causal_method(method, epochs, base)

    def method_description(self, method):
        if method in CAUSAL_METHODS:
            return CAUSAL_METHODS[method][1]
        return super().method_description(method)
