"""Preference tuning of a causal LM (`preference:` + `preference_file`):
DPO and its family, with LoRA, QLoRA or every weight."""

import os

import numpy as np

from kft import data as kft_data
from kft.data.preference import wordnet_preference_pairs
from kft.data.sft import read_records
from kft.lora.io import load_adapter
from kft.preference.model import PreferenceCausalLM
from kft.recipes import builders
from kft.recipes.errors import RecipeError
from kft.recipes.preference_config import PREFERENCE_LOSSES
from kft.recipes.tasks.causal_lm import CausalLMSFT

__all__ = ["PreferenceTuning", "evaluate_preference"]

# What `kft eval`, metrics.json and `kft compare` report.
REPORTED = ("loss", "reward_accuracy", "reward_margin", "rewards_chosen",
            "rewards_rejected", "logps_chosen", "logps_rejected")
REFERENCE_DIR = "reference_logps"
_PAIRED = tuple(loss for loss in PREFERENCE_LOSSES if loss != "kto")


def evaluate_preference(model, data):
    """Held-out preference loss, reward accuracy and margin, rewards and
    log-probabilities of a `PreferenceCausalLM`."""
    result = model.evaluate(data, verbose=0, return_dict=True)
    return {key: round(float(result[key]), 5) for key in REPORTED + ("kl",)
            if key in result}


def _options(config):
    preference = config.preference
    options = ({"label_smoothing": preference.label_smoothing}
               if preference.loss in ("dpo", "robust") else {})
    return dict(loss=preference.loss, beta=preference.beta,
                reference=preference.reference or "adapters_off", **options)


def _records(config, smoke):
    data_config = config.data
    limit = 8 if smoke else data_config.max_examples
    try:
        if data_config.source == "wordnet_pairs":
            return wordnet_preference_pairs(data_config.path, max_examples=limit,
                                            seed=config.seed)
        records = read_records(data_config.path)
    except (OSError, ValueError) as error:
        raise RecipeError(f"data.path: {error}") from None
    return records[:limit] if limit else records


def _dataset(records, lm, config, *, shuffle, reference, cache):
    data_config = config.data
    try:
        return kft_data.preference_dataset(
            records, lm, format=data_config.format,
            batch_size=data_config.batch_size, shuffle=shuffle,
            truncation=data_config.truncation, seed=config.seed,
            reference=reference, reference_cache=cache)
    except ValueError as error:
        raise RecipeError(f"data: {error}") from None


def preference_data(config, lm, reference=None, cache_dir=None, smoke=False):
    """The `DataBundle` of a preference recipe: the held-out split as SFT
    recipes draw it; reference log-probabilities of `reference` (kept in
    `cache_dir`) when the recipe's reference is `precomputed`."""
    records = _records(config, smoke)
    held = int(round(len(records) * config.data.validation_split))
    order = np.random.default_rng(config.seed).permutation(len(records))
    val = [records[i] for i in order[:held]]
    train = [records[i] for i in order[held:]]
    if config.preference.reference != "precomputed":
        reference = None

    def cache(name):
        return (os.path.join(cache_dir, f"{name}.npz")
                if cache_dir and reference is not None else None)

    train_ds = _dataset(train, lm, config, shuffle=config.data.shuffle,
                        reference=reference, cache=cache("train"))
    val_ds = (_dataset(val, lm, config, shuffle=False, reference=reference,
                       cache=cache("val")) if val else None)
    return kft_data.DataBundle(train_ds, val_ds, [], ())


class PreferenceTuning(CausalLMSFT):
    """A causal LM trained on preference records inside
    `kft.preference.PreferenceCausalLM`: held-out reward accuracy and margin
    before and after, greedy samples, adapters in kft's and PEFT's format
    (saving, `kft generate` and `kft export` as for SFT runs)."""

    name = "causal_lm_preference"
    default_methods = ("dpo", "ipo", "simpo", "orpo")
    #: Every method `kft compare` accepts for this task: the losses.
    methods = PREFERENCE_LOSSES

    def matches(self, config):
        return config.model.causal_lm is not None and config.preference is not None

    def build_model(self, config, bundle, input_shape, load_weights):
        lm = builders.causal_model(config).lm  # LoRA applied as for SFT
        try:
            return PreferenceCausalLM(lm, **_options(config))
        except ValueError as error:
            raise RecipeError(f"preference: {error}") from None

    def setup_after_model(self, run):
        """Preference data from the model's tokenizer (with the base's
        log-probabilities for a `precomputed` reference), greedy samples
        and held-out rewards before training."""
        lm = run.model.lm
        # The model before training (also when resuming: the checkpoint is
        # loaded after this): the reference of a precomputed run.
        run.bundle = preference_data(run.config, lm, reference=lm,
                                     cache_dir=run.path(REFERENCE_DIR),
                                     smoke=run.smoke)
        run.data_ready()
        run.samples = {"before": builders.generate_samples(
            lm, run.config.generate)}
        if run.bundle.val is not None and not run.smoke:
            run.model.compile()
            run.before = evaluate_preference(run.model, run.bundle.val)

    def finalize(self, run):
        from kft.recipes.causal import variable_bytes
        from kft.recipes.checkpoint import read_history
        from kft.training import report

        saved = self._save(run)
        rows = read_history(run.path("history.csv"))
        report.plot_curves(rows, run.path("plots", "curves.png"))
        evaluation = evaluate_preference(run.model,
                                         run.bundle.val or run.bundle.train)
        run.samples["after"] = builders.generate_samples(run.model.lm,
                                                         run.config.generate)
        if run.samples["after"]:
            report.write_metrics(run.path("samples.json"), run.samples)
        metrics = run.metrics(rows, evaluation)
        if rows:
            metrics["final"]["train"].update(
                {key: rows[-1][key] for key in REPORTED if key in rows[-1]})
        if run.before is not None:
            metrics["final"]["val_before"] = run.before
        metrics.update(saved, model_bytes=variable_bytes(run.model))
        return metrics

    def load_run(self, run_dir, config):
        """The base rebuilt from its recipe inside a `PreferenceCausalLM`
        (a `copy` reference copies the base here), then the run's adapters
        (`adapter.npz`) or weights (`model.weights.h5`)."""
        name = "adapter.npz" if config.lora else "model.weights.h5"
        path = os.path.join(run_dir, name)
        if not os.path.exists(path):
            raise RecipeError(f"{run_dir!r} is not a finished preference run "
                              f"(no {name}).")
        lm = builders.causal_model(config).lm
        model = PreferenceCausalLM(lm, **_options(config))
        if config.lora:
            load_adapter(lm, path)
        else:
            lm.load_weights(path)
        return model

    def evaluate_run(self, run_dir, config, model, data_path=None):
        """Held-out preference loss, reward accuracy and margin (`eval.json`),
        on the recipe's held-out split or on `data_path` (records in the
        recipe's `data.format`)."""
        reference = None
        if config.preference.reference == "precomputed":
            reference = builders.causal_model(config).lm  # the base, again
        cache_dir = os.path.join(run_dir, REFERENCE_DIR)
        if data_path:
            try:
                records = read_records(data_path)
            except (OSError, ValueError) as error:
                raise RecipeError(f"--data: {error}") from None
            data = _dataset(records, model.lm, config, shuffle=False,
                            reference=reference, cache=None)
        else:
            bundle = preference_data(config, model.lm, reference, cache_dir)
            data = bundle.val if bundle.val is not None else bundle.train
        model.compile()
        return evaluate_preference(model, data)  # kft eval writes eval.json

    def method_changes(self, method, epochs, base):
        """`kft compare` on a preference recipe compares losses: the
        recipe's first stage and reference, with `method` as the loss."""
        paired = base["data"]["format"] != "unpaired"
        losses = _PAIRED if paired else ("kto",)
        if method not in losses:
            return None, (f"preference runs compare losses; on "
                          f"{'pairs' if paired else 'unpaired records'}: "
                          f"{', '.join(losses)}")
        reference = base["preference"].get("reference")
        if method in ("simpo", "orpo") or reference == "adapters_off":
            reference = None  # reference-free, or the recipe's default
        stage = {**base["stages"][0], "name": method, "epochs": epochs}
        same = method == base["preference"]["loss"]
        preference = {**base["preference"], "loss": method,
                      "beta": base["preference"]["beta"] if same else None,
                      "reference": reference,
                      "label_smoothing": (base["preference"]["label_smoothing"]
                                          if method in ("dpo", "robust") else 0.0)}
        return {"stages": [stage], "policy": None, "preference": preference}, None

    def method_description(self, method):
        return {
            "dpo": "DPO: -log sigmoid(beta h), h the log-ratio margin over "
                   "the reference",
            "robust": "robust DPO (rDPO), unbiased under label noise",
            "ipo": "IPO: (h - 1 / (2 beta))^2",
            "hinge": "SLiC's hinge: max(0, 1 - beta h)",
            "simpo": "SimPO: length-normalised, reference-free, target margin",
            "orpo": "ORPO: chosen NLL + odds-ratio term, reference-free",
            "kto": "KTO: unpaired, each answer against a KL reference point",
        }.get(method, "")
