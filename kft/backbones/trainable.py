"""What may train: the grammar of a stage's `trainable` spec, checked
without TensorFlow (`kft validate` reads it; `kft.backbones.freezing`
applies it).
"""

__all__ = ["TRAINABLE_CHOICES", "parse_trainable"]

TRAINABLE_CHOICES = (
    "'head', 'all', 'none', 'keep', {last_n_blocks: k (int >= 0 or 'all')} or "
    "{layers: regex}"
)


def parse_trainable(value):
    """Checks a stage's `trainable` spec and returns it normalised.

    `"head"`, `"all"`, `"none"`, `"keep"`, `{"last_n_blocks": k}` (`k` an
    integer >= 0 or `"all"`) or `{"layers": regex}`.
    """
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    if value in ("head", "all", "none", "keep"):
        return value
    if isinstance(value, dict) and len(value) == 1:
        (key, arg), = value.items()
        if key == "last_n_blocks" and (
            arg == "all" or (isinstance(arg, int) and not isinstance(arg, bool)
                             and arg >= 0)
        ):
            return {key: arg}
        if key == "layers" and isinstance(arg, str) and arg:
            return {key: arg}
    raise ValueError(
        f"trainable must be {TRAINABLE_CHOICES}. Received: trainable={value!r}")
