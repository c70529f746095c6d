"""The methods `kft compare` measures: what each sets in a recipe.

Each method is a named stage policy (and adapter section) applied to the
same recipe; a task (`kft.recipes.tasks`) says which methods apply to its
kind of model, through these functions.
"""

from kft.recipes.causal import causal_method_changes
from kft.recipes.errors import RecipeError
from kft.training.stages import policy_stages

__all__ = ["DEFAULT_CAUSAL_METHODS", "DEFAULT_METHODS", "DESCRIPTIONS",
           "METHODS", "audio_method", "causal_method", "method_stages"]

DEFAULT_METHODS = ("head", "full", "gradual", "discriminative")
DEFAULT_CAUSAL_METHODS = ("full", "lora", "qlora", "prompt")
METHODS = ("head", "full", "gradual", "discriminative", "lora", "dora",
           "pissa", "loraplus", "prompt", "qlora")
_TEXT_ONLY = ("prompt",)
# The LoRA variants: the `lora` method's adapters (same targets, rank and
# rate) with one `lora:` option changed.
_LORA_VARIANTS = {"lora": {}, "dora": {"use_dora": True},
                  "pissa": {"init": "pissa"}, "loraplus": {"lr_ratio": 16}}

# Learning rates per method: (image model, text model). Pretrained CNNs
# take larger rates than transformers; adapters and prompts larger still.
_RATES = {
    "head": (1e-3, 5e-3),
    "full": (1e-4, 5e-5),
    "gradual": (1e-3, 1e-4),
    "discriminative": ((1e-5, 1e-3), 1e-4),
    "lora": (1e-3, 1e-3),
    "dora": (1e-3, 1e-3),
    "pissa": (1e-3, 1e-3),
    # A's rate (and the head's), a quarter of lora's; B at 16x. At lora's
    # 1e-3, B's 1.6e-2 diverged on the quickstart task and lost 16 points
    # on MiniLM.
    "loraplus": (2.5e-4, 2.5e-4),
    "prompt": (None, 1e-2),
}
DESCRIPTIONS = {
    "head": "backbone frozen, the head alone (a linear probe for text models)",
    "full": "every weight trains at one small rate",
    "gradual": "the head for one epoch, then one more backbone block per epoch",
    "discriminative": ("every weight, rates spread from the stem (lowest) to "
                       "the head (CNNs) or decayed 0.8x per layer below the "
                       "head (transformers)"),
    "lora": ("LoRA rank 8 on query and value (transformers) or the 1x1 "
             "convolutions (CNNs), plus the head"),
    "dora": "as lora, with DoRA (a trained magnitude per output unit)",
    "pissa": "as lora, A and B started from the kernel's top singular vectors",
    "loraplus": "as lora, with LoRA+: the B matrices at 16x the rate",
    "prompt": "20 virtual tokens plus the head; the backbone frozen",
}


def method_stages(method, epochs, text):
    """The `stages:` (and adapter sections) a method stands for.

    Returns:
        `(changes, reason)`: the recipe keys to set, or `None` and why the
        method does not apply.
    """
    if method not in METHODS:
        raise RecipeError(
            f"--methods: unknown method {method!r}; allowed: {', '.join(METHODS)}")
    if method == "qlora":  # see kft.recipes.causal.causal_method_changes
        return None, ("quantizes a causal LM's base (model.causal_lm); this "
                      "recipe's model is not one")
    if method in _TEXT_ONLY and not text:
        return None, ("adapts transformer text models (model.text); this "
                      "recipe's model is an image model")
    rate = _RATES[method][1 if text else 0]
    if method == "gradual" and epochs < 2:
        return None, "needs at least 2 epochs (one for the head)"
    if method == "head":
        stages = [{"name": "head", "epochs": epochs, "trainable": "head",
                   "learning_rate": rate}]
    elif method == "full":
        stages = [{"name": "full", "epochs": epochs, "trainable": "all",
                   "learning_rate": rate}]
    elif method == "gradual":
        stages = policy_stages("gradual", epochs - 1, freeze_epochs=1, every=1,
                               learning_rate=rate)
    elif method == "discriminative":
        stage = {"name": "discriminative", "epochs": epochs, "trainable": "all"}
        if text:
            stage.update(learning_rate=rate, layer_decay=0.8)
        else:
            stage.update(learning_rate=list(rate))
        stages = [stage]
    else:
        stages = [{"name": method, "epochs": epochs, "trainable": "keep",
                   "learning_rate": rate}]
    changes = {"stages": stages, "policy": None, "lora": None,
               "prompt_tuning": None}
    if method in _LORA_VARIANTS:
        targets = ["query", "value"] if text else ["query", "value", "pointwise"]
        changes["lora"] = {"targets": targets, "rank": 8, "alpha": 16,
                           **_LORA_VARIANTS[method]}
    if method == "prompt":
        changes["prompt_tuning"] = {"num_virtual_tokens": 20}
    return changes, None


def causal_method(method, epochs, base):
    """A method on a causal LM (`kft.recipes.causal`); the LoRA variants
    are its `lora` method with their option (LoRA+ at a quarter of the
    rate, as on text and image models)."""
    if method == "lora" or method not in _LORA_VARIANTS:
        return causal_method_changes(method, epochs, base)
    changes, reason = causal_method_changes("lora", epochs, base)
    stage = changes["stages"][0]
    stage["name"] = method
    if method == "loraplus":
        stage["learning_rate"] /= 4
    changes["lora"] = {**changes["lora"], **_LORA_VARIANTS[method]}
    return changes, reason


def audio_method(method, epochs):
    """A method on a Whisper encoder (`model.audio`): as on a text
    transformer (its rates, LoRA on query and value, layer-wise rate
    decay over the encoder's blocks), without prompt tuning. Gradual
    unfreezing's first epoch trains the new head alone, at the `head`
    method's rate: at 1e-4 it stayed near chance (0.27 after 3 epochs on
    `speech_commands_whisper_tiny`)."""
    if method in _TEXT_ONLY:
        return None, ("adapts transformer text models (model.text); this "
                      "recipe's model is an audio model")
    changes, reason = method_stages(method, epochs, True)
    if method == "gradual" and changes is not None:
        first = {**changes["stages"][0], "learning_rate": _RATES["head"][1]}
        changes["stages"] = [first, *changes["stages"][1:]]
    return changes, reason
