"""The recipe's `preference:` section and the `preference_file` data source
(Keras-free: `kft validate` checks them without loading TensorFlow)."""

from typing import Literal

from pydantic import Field

from kft.utils.validation import Strict

__all__ = ["PREFERENCE_FORMATS", "PREFERENCE_LOSSES", "PREFERENCE_SOURCES",
           "PreferenceConfig", "check_preference"]

PREFERENCE_SOURCES = ("preference_file", "wordnet_pairs")
# kft.losses.preference.LOSSES and kft.data.preference.PREFERENCE_FORMATS,
# named here without importing Keras (a test keeps them equal).
PREFERENCE_LOSSES = ("dpo", "robust", "ipo", "hinge", "simpo", "orpo", "kto")
PREFERENCE_FORMATS = ("prompt_chosen_rejected", "messages", "unpaired")
_REFERENCE_FREE = ("simpo", "orpo")


class PreferenceConfig(Strict):
    """`preference:` preference tuning of a causal LM
    (`kft.preference.PreferenceCausalLM`) on a `preference_file` or on
    `wordnet_pairs` (a noun's WordNet gloss preferred to another noun's).

    `loss`: `dpo`, `robust`, `ipo`, `hinge` (against a reference), `simpo`,
    `orpo` (reference-free) or `kto` (unpaired data, `data.format:
    unpaired`). `beta`: the loss's beta (default the paper's: 2.0 for
    SimPO, 0.1 otherwise). `reference`: `adapters_off` (the default with
    `lora:`: the same weights with the adapters switched off),
    `precomputed` (the default without: the base's log-probabilities
    computed once before training and kept in the run directory) or `copy`
    (a frozen second copy of the weights). `label_smoothing`: cDPO's for
    `dpo`, the noise rate for `robust`.
    """

    loss: Literal["dpo", "robust", "ipo", "hinge", "simpo", "orpo", "kto"] = "dpo"
    beta: float | None = Field(default=None, gt=0)
    reference: Literal["adapters_off", "precomputed", "copy"] | None = None
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)


def _check_data(recipe):
    data = recipe.data
    if recipe.preference is not None and data.source not in PREFERENCE_SOURCES:
        raise ValueError(f"preference: trains on a preference data source "
                         f"{list(PREFERENCE_SOURCES)}; data.source is "
                         f"{data.source!r}")
    if data.source not in PREFERENCE_SOURCES:
        if data.format in PREFERENCE_FORMATS and data.format != "messages":
            raise ValueError(f"data.format {data.format!r} is for source "
                             "'preference_file'")
        return False
    if "format" not in data.model_fields_set:
        data.format = "prompt_chosen_rejected"
    if data.source == "wordnet_pairs" and data.format != "prompt_chosen_rejected":
        raise ValueError("data.format of source 'wordnet_pairs' is "
                         f"'prompt_chosen_rejected'; received {data.format!r}")
    if data.format not in PREFERENCE_FORMATS:
        raise ValueError(f"data.format of a preference_file is one of "
                         f"{list(PREFERENCE_FORMATS)}; received {data.format!r}")
    if data.packing:
        raise ValueError("data.packing: preference pairs are not packed (each "
                         "row holds one answer); set data.packing: false")
    return True


def check_preference(recipe):
    """Checks a `RecipeConfig`'s `preference:` section against its data and
    adapters, and fills in the defaults (`reference`, `data.format`).

    Raises:
        ValueError: naming the key, the value and what is allowed.
    """
    if not _check_data(recipe):
        return recipe
    if recipe.preference is None:
        recipe.preference = PreferenceConfig()
    preference, data = recipe.preference, recipe.data
    if (preference.loss == "kto") != (data.format == "unpaired"):
        raise ValueError(
            f"preference.loss {preference.loss!r} and data.format "
            f"{data.format!r} do not go together: loss 'kto' trains on "
            "unpaired records (format 'unpaired'), the others on pairs")
    if recipe.prompt_tuning is not None:
        raise ValueError("prompt_tuning: is not available with preference:; "
                         "use lora: (or neither, for full fine-tuning)")
    if preference.label_smoothing and preference.loss not in ("dpo", "robust"):
        raise ValueError("preference.label_smoothing is for loss 'dpo' (cDPO) "
                         f"and 'robust'; loss is {preference.loss!r}")
    if preference.loss in _REFERENCE_FREE:
        if preference.reference is not None:
            raise ValueError(f"preference.reference: loss {preference.loss!r} "
                             "is reference-free; leave reference out")
        return recipe
    if preference.reference is None:
        preference.reference = ("adapters_off" if recipe.lora is not None
                                else "precomputed")
    if preference.reference == "adapters_off" and recipe.lora is None:
        raise ValueError("preference.reference 'adapters_off' is the base with "
                         "the LoRA adapters off, and this recipe has no lora:; "
                         "use 'precomputed' or 'copy'")
    if preference.reference == "copy" and recipe.lora is not None:
        raise ValueError("preference.reference 'copy' keeps a second copy of "
                         "the weights, for full fine-tuning; with lora: use "
                         "'adapters_off' (or 'precomputed')")
    return recipe
