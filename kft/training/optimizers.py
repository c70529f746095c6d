"""Per-layer learning rates on `keras.optimizers.MultiOptimizer`.

Fine-tuning wants small learning rates for pretrained layers and a large
one for the new head. Keras 3.15 gained `MultiOptimizer` + `OptimizerMap`
(a regex-to-optimizer map); kft builds the groups a user means on top of
it: rules by regex, layer name, block name or block index, fastai's
`lr=(low, high)` spread over the blocks, and layer-wise LR decay for CNN
and keras-hub transformer backbones.
"""

import re

import keras

from kft._keras_internals import all_layers
from kft._keras_internals import optimizer_map
from kft._keras_internals import optimizer_rate
from kft.backbones.anatomy import backbone_blocks_of
from kft.backbones.anatomy import count_params
from kft.backbones.anatomy import describe as describe_model
from kft.backbones.anatomy import head_layers
from kft.lora.base import lora_layers
from kft.training.stages import OPTIMIZERS

__all__ = [
    "DEFAULT_WEIGHT_DECAY_EXCLUDES",
    "DiscriminativeOptimizer",
    "describe_groups",
    "discriminative",
    "format_description",
    "layerwise_lr_decay",
    "loraplus",
    "lr_blocks",
    "lr_range_rules",
]

# The names stages accept (`kft.stages.OPTIMIZERS`) -> Keras classes.
OPTIMIZER_CLASSES = {name: getattr(keras.optimizers, class_name)
                     for name, class_name in OPTIMIZERS.items()}
# Variable names (searched in `variable.name`) that never get weight
# decay: biases and normalisation scales and offsets.
DEFAULT_WEIGHT_DECAY_EXCLUDES = ("bias", "gamma", "beta")


@keras.saving.register_keras_serializable(package="kft")
class DiscriminativeOptimizer(keras.optimizers.MultiOptimizer):
    """A `MultiOptimizer` whose groups can be scaled together.

    `keras.optimizers.MultiOptimizer` refuses `learning_rate`, so
    `ReduceLROnPlateau`, `LearningRateScheduler` and LR finders cannot
    drive it. Here `learning_rate` reads the largest group rate (the head's,
    usually) and setting it scales every group by the same factor, keeping
    their ratios.
    """

    def _group_rates(self):
        return [float(keras.ops.convert_to_numpy(opt.learning_rate))
                for opt in self.optimizers]

    @property
    def learning_rate(self):
        return max(self._group_rates())

    @learning_rate.setter
    def learning_rate(self, value):
        if not hasattr(self, "_inner_optimizers"):
            return  # called by Optimizer.__init__ before the groups exist
        current = self.learning_rate
        value = float(keras.ops.convert_to_numpy(value))
        factor = value / current if current else 0.0
        for opt in self.optimizers:
            rate = float(keras.ops.convert_to_numpy(opt.learning_rate))
            opt.learning_rate = rate * factor if current else value


def _optimizer_class(name):
    if isinstance(name, str) and name.lower() in OPTIMIZER_CLASSES:
        return OPTIMIZER_CLASSES[name.lower()]
    raise ValueError(
        f"Unknown optimizer {name!r}. Allowed: {sorted(OPTIMIZER_CLASSES)}."
    )


def _layer_regex(layers):
    """A regex on variable.path for the variables of `layers`: by layer
    name where their paths start with it, else the exact paths (layers
    nested in a container, such as a keras-hub ViT's encoder blocks)."""
    names = sorted({layer.name for layer in layers})
    by_name = "(?:" + "|".join(re.escape(n) for n in names) + ")/.*"
    paths = sorted({v.path for layer in layers for v in layer.weights})
    if all(re.fullmatch(by_name, path) for path in paths):
        return by_name
    return "(?:" + "|".join(re.escape(path) for path in paths) + ")"


def lr_blocks(model):
    """The model's learning-rate groups, bottom to top: `(name, layers)`.

    CNN backbones (kft models): the backbone blocks of
    `kft.backbone_blocks`. keras-hub transformer backbones: `embeddings`
    (everything before the first transformer layer), then each
    `transformer_layer_i`, then `top` (layers after the last one, such as
    a pooler) when there are any. The head, everything outside the
    backbone, comes last as `head`.
    """
    if describe_model(model).backbone is None:
        raise ValueError(
            f"Model {model.name!r} has no backbone kft recognises (a layer "
            "named 'backbone', or a keras-hub backbone with "
            "'transformer_layer_N' layers). Use `rules=` with regexes "
            "instead."
        )
    named = [(n, ls) for n, ls in backbone_blocks_of(model)
             if any(layer.weights for layer in ls)]
    head = head_layers(model)
    if head:
        named.append(("head", head))
    return named


def _resolve_rule(model, key, blocks):
    """A rule key -> (label, regex on variable.path)."""
    if isinstance(key, bool):
        raise ValueError(f"Rule key {key!r} is not a regex, name or block index.")
    if isinstance(key, int):
        backbone_only = [b for b in blocks if b[0] != "head"]
        if not -len(backbone_only) <= key < len(backbone_only):
            raise ValueError(
                f"Rule key {key} is not a block index: the backbone has "
                f"{len(backbone_only)} blocks (0 to {len(backbone_only) - 1}, "
                "or negative from the top)."
            )
        name, layers = backbone_only[key]
        return f"block {key} ({name})", _layer_regex(layers)
    if not isinstance(key, str):
        raise ValueError(f"Rule key {key!r} is not a regex, name or block index.")
    by_name = dict(blocks)
    if key in by_name:
        return key, _layer_regex(by_name[key])
    if key == "backbone":
        return key, _layer_regex(
            [layer for name, ls in blocks if name != "head" for layer in ls])
    layer_names = {layer.name for layer in all_layers(model)}
    if key in layer_names:
        return key, re.escape(key) + "/.*"
    try:
        re.compile(key)
    except re.error as error:
        raise ValueError(f"Rule {key!r} is not a valid regex: {error}") from None
    return key, key


def _check_rate(label, rate):
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
        return rate
    if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate >= 0:
        return float(rate)
    raise ValueError(
        f"Learning rate of rule {label!r} must be a number >= 0 or a "
        f"keras.optimizers.schedules.LearningRateSchedule. Received: {rate!r}"
    )


def _make(cls, rate, kwargs, exclude):
    opt = cls(learning_rate=rate, **kwargs)
    if exclude and getattr(opt, "weight_decay", None):
        opt.exclude_from_weight_decay(var_names=list(exclude))
    return opt


def _build(model, groups, optimizer, default_lr, exclude, kwargs):
    """groups: list of (label, regex, rate) -> DiscriminativeOptimizer."""
    cls = _optimizer_class(optimizer)
    variables = [v for v in model.weights]
    owners = {}
    for label, regex, _ in groups:
        pattern = re.compile(regex)
        matched = [v for v in variables if pattern.fullmatch(v.path)]
        if not matched:
            raise ValueError(
                f"Rule {label!r} matches no variable of model {model.name!r} "
                f"(rules are matched in full against variable.path, e.g. "
                f"{variables[0].path!r}; layer names, block names and block "
                "indices work too)."
            )
        for v in matched:
            if v.path in owners:
                raise ValueError(
                    f"Variable {v.path!r} matches two rules: "
                    f"{owners[v.path]!r} and {label!r}. Make the rules disjoint."
                )
            owners[v.path] = label
    optimizer_map = keras.optimizers.OptimizerMap(
        _make(cls, _check_rate("default", default_lr), kwargs, exclude)
    )
    for label, regex, rate in groups:
        optimizer_map[regex] = _make(cls, _check_rate(label, rate), kwargs, exclude)
    result = DiscriminativeOptimizer(optimizer_map, name="discriminative")
    result.kft_groups = [(label, regex) for label, regex, _ in groups]
    return result


def discriminative(
    model,
    rules=None,
    optimizer="adam",
    default_lr=1e-3,
    *,
    lr=None,
    exclude_from_weight_decay=DEFAULT_WEIGHT_DECAY_EXCLUDES,
    **optimizer_kwargs,
):
    """An optimizer with a learning rate per group of layers.

    Args:
        model: the model to train.
        rules: maps a key to a learning rate (a number or a Keras
            `LearningRateSchedule`). A key is a backbone block index (`0`
            is the stem, `-1` the top block), a block name (`"block_16"`,
            `"top"`, `"head"`, `"backbone"`), a layer name, or a regex
            matched in full against `variable.path` (Keras'
            `OptimizerMap` semantics, e.g. `"head_.*"`).
        optimizer: a Keras optimizer name (`adam`, `adamw`, `sgd`, ...);
            each group gets its own instance.
        default_lr: the rate of variables no rule matches.
        lr: instead of `rules`, a `(low, high)` pair spread geometrically
            over the backbone blocks and the head, as fastai's
            `slice(low, high)`: the bottom block gets `low`, the head `high`.
        exclude_from_weight_decay: variable names (substrings) that get no
            weight decay: biases and normalisation parameters by default.
        **optimizer_kwargs: passed to every group's optimizer (e.g.
            `weight_decay`, `beta_1`, `gradient_accumulation_steps`).

    Returns:
        A `keras.optimizers.MultiOptimizer` (a `DiscriminativeOptimizer`).

    Example:

    ```python
    optimizer = kft.optimizers.discriminative(
        model, {"head": 1e-3, "backbone": 1e-5})
    optimizer = kft.optimizers.discriminative(model, lr=(1e-5, 1e-3))
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    ```
    """
    if (rules is None) == (lr is None):
        raise ValueError("Pass either rules={...} or lr=(low, high), not both.")
    blocks = (lr_blocks(model) if lr is not None or describe_model(model).backbone
              else [])
    groups = []
    if lr is not None:
        if not isinstance(lr, (tuple, list)) or len(lr) != 2:
            raise ValueError(
                f"lr must be a pair (low, high) with 0 < low <= high. "
                f"Received: lr={lr!r}"
            )
        rules = lr_range_rules(model, float(lr[0]), float(lr[1]))
    if not isinstance(rules, dict) or not rules:
        raise ValueError(
            f"rules must be a non-empty dict of key -> learning rate. "
            f"Received: rules={rules!r}"
        )
    for key, rate in rules.items():
        label, regex = _resolve_rule(model, key, blocks)
        groups.append((label, regex, rate))
    return _build(model, groups, optimizer, default_lr,
                  exclude_from_weight_decay, optimizer_kwargs)


def lr_range_rules(model, low, high):
    """fastai's `slice(low, high)`: `{block_name: rate}`, geometric from the
    bottom block (`low`) to the head (`high`)."""
    if not 0 < low <= high:
        raise ValueError(
            f"lr must be a pair (low, high) with 0 < low <= high. "
            f"Received: lr={(low, high)!r}"
        )
    blocks = lr_blocks(model)
    count = len(blocks)
    return {
        name: low * (high / low) ** (i / (count - 1) if count > 1 else 1.0)
        for i, (name, _) in enumerate(blocks)
    }


def layerwise_lr_decay(
    model,
    base_lr,
    decay,
    optimizer="adamw",
    *,
    exclude_from_weight_decay=DEFAULT_WEIGHT_DECAY_EXCLUDES,
    **optimizer_kwargs,
):
    """Layer-wise learning-rate decay (ELECTRA, BEiT, timm).

    The head gets `base_lr`; each block below it gets `decay` times the
    rate of the block above, so the block at depth `d` under the head
    trains at `base_lr * decay**d`. Blocks are those of `lr_blocks`: the
    CNN backbone's blocks, or a keras-hub transformer's embeddings and
    `transformer_layer_i`.

    Args:
        model: the model to train.
        base_lr: the head's learning rate (number or schedule).
        decay: factor in (0, 1].
        optimizer: a Keras optimizer name.

    Returns:
        A `keras.optimizers.MultiOptimizer` (a `DiscriminativeOptimizer`).
    """
    if not isinstance(decay, (int, float)) or not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1]. Received: decay={decay!r}")
    blocks = lr_blocks(model)
    groups = []
    top = len(blocks) - 1
    for i, (name, layers) in enumerate(blocks):
        depth = top - i if blocks[-1][0] == "head" else top - i + 1
        rate = _scaled(base_lr, decay ** depth)
        groups.append((name, _layer_regex(layers), rate))
    return _build(model, groups, optimizer, _scaled(base_lr, 1.0),
                  exclude_from_weight_decay, optimizer_kwargs)


def loraplus(
    model,
    learning_rate,
    ratio=16,
    optimizer="adamw",
    *,
    exclude_from_weight_decay=DEFAULT_WEIGHT_DECAY_EXCLUDES,
    **optimizer_kwargs,
):
    """LoRA+ (Hayou et al. 2024): the `B` matrices learn `ratio` times
    faster than the `A` matrices.

    Three groups: `lora_a` (every LoRA `A`) at `learning_rate`, `lora_b`
    (every `B`) at `learning_rate * ratio`, and every other trainable
    variable (a head, DoRA magnitudes) at `learning_rate`. A schedule as
    `learning_rate` drives all three (`B`'s scaled by `ratio`). PEFT's
    `create_loraplus_optimizer` differs in two corners: it also puts every
    1-D trainable parameter (biases, DoRA magnitudes) in `B`'s group, and
    LoRA on embeddings at a rate of its own (`loraplus_lr_embedding`,
    1e-6 by default); here both train at `learning_rate`.

    Args:
        model: a model with kft LoRA layers (`kft.lora.apply_lora`).
        learning_rate: the rate of `A` and of everything but `B` (a number
            or a Keras `LearningRateSchedule`).
        ratio: `B`'s rate over `A`'s (the paper suggests 16, i.e. 2**4).
        optimizer: a Keras optimizer name (`adamw`, `adam`, `sgd`, ...).
        exclude_from_weight_decay: as `discriminative`.
        **optimizer_kwargs: as `discriminative`.

    Returns:
        A `keras.optimizers.MultiOptimizer` (a `DiscriminativeOptimizer`).

    Example:

    ```python
    kft.lora.apply_lora(model, rank=8)
    model.compile(optimizer=kft.optimizers.loraplus(model, 2e-4, ratio=16),
                  loss="sparse_categorical_crossentropy")
    ```
    """
    if (not isinstance(ratio, (int, float)) or isinstance(ratio, bool)
            or ratio <= 0):
        raise ValueError(f"ratio must be a number > 0 (B's learning rate over "
                         f"A's). Received: ratio={ratio!r}")
    if not lora_layers(model):
        raise ValueError(
            f"loraplus: model {model.name!r} has no LoRA layers; call "
            "kft.lora.apply_lora first.")
    rate = _check_rate("lora_a", learning_rate)
    groups = [("lora_a", r".*/lora_a", rate),
              ("lora_b", r".*/lora_b", _scaled(rate, ratio))]
    return _build(model, groups, optimizer, rate, exclude_from_weight_decay,
                  optimizer_kwargs)


@keras.saving.register_keras_serializable(package="kft")
class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A schedule multiplied by a constant (one group's share of it)."""

    def __init__(self, schedule, factor):
        self.schedule = schedule
        self.factor = float(factor)

    def __call__(self, step):
        return self.schedule(step) * self.factor

    def get_config(self):
        return {
            "schedule": keras.saving.serialize_keras_object(self.schedule),
            "factor": self.factor,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["schedule"] = keras.saving.deserialize_keras_object(
            config["schedule"])
        return cls(**config)


def _scaled(rate, factor):
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
        return rate if factor == 1.0 else ScaledSchedule(rate, factor)
    return float(rate) * factor


def describe_groups(optimizer, model):
    """One row per group: rule, variables, parameters, learning rate, decay.

    Returns:
        A list of dicts with keys `group`, `variables`, `params`,
        `learning_rate`, `weight_decay`.
    """
    if not isinstance(optimizer, keras.optimizers.MultiOptimizer):
        groups = [("all", optimizer, list(model.trainable_weights))]
    else:
        by_opt = {}
        groups_map = optimizer_map(optimizer)
        for v in model.trainable_weights:
            by_opt.setdefault(id(groups_map(v)), []).append(v)
        labels = {}
        for label, regex in getattr(optimizer, "kft_groups", []):
            labels[id(groups_map[regex])] = label
        groups = [
            (labels.get(id(opt), "default"), opt, by_opt.get(id(opt), []))
            for opt in optimizer.optimizers
        ]
    rows = []
    for label, opt, variables in groups:
        rate = optimizer_rate(opt)
        if not isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
            rate = opt.learning_rate
        rows.append({
            "group": label,
            "variables": len(variables),
            "params": count_params(variables),
            "learning_rate": (
                float(keras.ops.convert_to_numpy(rate))
                if not callable(rate) else type(rate).__name__
            ),
            "weight_decay": getattr(opt, "weight_decay", None),
        })
    return rows


def format_description(optimizer, model):
    """`describe` as a text table."""
    lines = [f"{'group':<24}{'vars':>6}{'params':>12}{'lr':>12}{'wd':>10}"]
    for r in describe_groups(optimizer, model):
        lr = r["learning_rate"]
        lr = f"{lr:.3g}" if isinstance(lr, float) else lr
        wd = r["weight_decay"]
        lines.append(f"{r['group']:<24}{r['variables']:>6}{r['params']:>12,}"
                     f"{lr:>12}{wd if wd is not None else '-':>10}")
    return "\n".join(lines)
