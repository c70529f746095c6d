"""Freeze and unfreeze by blocks, layers or regex, and say what trains.

Keras computes a model's trainable weights from the `trainable` flags of
the model and every layer inside it: a layer only trains when it and all
its parents are trainable. These helpers keep that straight, so that
`unfreeze(model, last_n_blocks=2)` on a frozen model trains exactly the
two top backbone blocks (and whatever was trainable before).

Changing `trainable` takes effect at the next `compile()`; inside a
running `fit`, use `kft.callbacks.GradualUnfreezing` instead.

BatchNorm policy. In Keras 3 a nested model called with `training=False`
inside a functional model still receives `training=True` from `fit` (the
functional graph passes the outer call's value down), so that call alone
does not keep BatchNorm in inference mode. What does is Keras 3's rule
that a BatchNorm layer with `trainable=False` always runs in inference
mode. So for models built with `bn="frozen"` (the default), kft keeps the
backbone's BatchNorm layers untrainable whatever else it unfreezes: their
statistics and their scale and offset stay as pretrained. With
`bn="train"` they unfreeze with their block, as in fastai.
"""

import re

import keras

from kft._keras_internals import all_layers
from kft._keras_internals import child_layers
from kft._keras_internals import set_trainable_flag
from kft.backbones.anatomy import backbone_blocks_of
from kft.backbones.anatomy import count_params
from kft.backbones.anatomy import describe
from kft.backbones.anatomy import find_backbone
from kft.backbones.anatomy import head_layers
from kft.backbones.trainable import parse_trainable

__all__ = [
    "batch_norm_policy",
    "find_backbone",
    "format_trainable_summary",
    "freeze",
    "set_trainable",
    "set_trainable_flag",
    "train_only",
    "trainable_summary",
    "unfreeze",
]

# The name `kft.build_classifier` gives the nested backbone. Functions
# that take `backbone=` default to the model's recorded anatomy instead.
BACKBONE = "backbone"


def leaves(layer):
    """All layers under `layer` (itself included) that hold no sublayers."""
    children = child_layers(layer)
    if not children:
        return [layer]
    return [leaf for child in children for leaf in leaves(child)]


def train_only(model, layers):
    """Freezes the whole model except `layers` (and what they contain).

    Unlike setting flags one by one, the containers around those layers
    are opened, so Keras really trains them.
    """
    set_trainable_flag(model, False)
    _trainable_after(model, {id(leaf): True for layer in layers
                             for leaf in leaves(layer)})
    return model


def freeze(model_or_layer):
    """Makes a model or layer, and everything inside it, untrainable."""
    return set_trainable_flag(model_or_layer, False)


def _trainable_after(model, changes):
    """Sets flags so that leaf layers in `changes` get the given state and
    every other leaf keeps its current state."""
    all_leaves = leaves(model)
    state = {id(leaf): leaf.trainable for leaf in all_leaves}
    state.update(changes)
    # A layer only trains if all its parents do: open every container,
    # then set each leaf. Containers with no trainable leaf are closed
    # again so that summaries read naturally.
    set_trainable_flag(model, True)
    for leaf in all_leaves:
        set_trainable_flag(leaf, state[id(leaf)])
    _close_empty_containers(model)


def _close_empty_containers(layer):
    children = list(child_layers(layer))
    if not children:
        return layer.trainable
    any_trainable = False
    for child in children:
        any_trainable |= _close_empty_containers(child)
    if not any_trainable and layer.trainable:
        # Setting a container's flag resets its children: only do it when
        # all of them are already off.
        set_trainable_flag(layer, False)
    return any_trainable


def batch_norm_policy(model, backbone=None):
    """Returns `"frozen"` or `"train"`: how the model treats backbone BatchNorm.

    Read from the model's anatomy (`kft.describe`), which
    `build_classifier(bn=...)` records and `.keras` files keep.
    """
    del backbone  # the policy is the model's, whatever the backbone name
    return describe(model).batch_norm


def _freeze_backbone_batch_norm(model, backbone):
    try:
        base = find_backbone(model, backbone)
    except ValueError:
        return
    for layer in all_layers(base):
        if isinstance(layer, keras.layers.BatchNormalization):
            set_trainable_flag(layer, False)


def unfreeze(
    model,
    *,
    last_n_blocks=None,
    layers=None,
    batch_norm=None,
    backbone=None,
):
    """Makes parts of a model trainable, leaving the rest as it was.

    With no arguments, everything becomes trainable.

    Args:
        model: a model built by `kft.build_classifier`, or any model (for
            `layers=`).
        last_n_blocks: number of top backbone blocks to unfreeze (see
            `kft.backbone_blocks`), or `"all"`.
        layers: a regex searched in layer names; matching layers (and the
            layers inside them) become trainable.
        batch_norm: whether the backbone's BatchNormalization layers may
            unfreeze too. Defaults to the model's policy
            (`batch_norm_policy`): False for `bn="frozen"` models.
        backbone: name of the nested backbone model.

    Returns:
        The number of layers made trainable.

    Example:

    >>> model = build_classifier("vgg16", 2, input_shape=(32, 32, 3))
    >>> unfreeze(model, last_n_blocks=1)
    5
    """
    targets = []
    if last_n_blocks is None and layers is None:
        targets = leaves(model)
    if last_n_blocks is not None:
        blocks = backbone_blocks_of(model, backbone)
        if last_n_blocks == "all":
            last_n_blocks = len(blocks)
        if not isinstance(last_n_blocks, int) or last_n_blocks < 0:
            raise ValueError(
                "last_n_blocks must be an integer >= 0 or 'all'. Received: "
                f"last_n_blocks={last_n_blocks!r}"
            )
        if last_n_blocks > len(blocks):
            raise ValueError(
                f"last_n_blocks={last_n_blocks} but the backbone has only "
                f"{len(blocks)} blocks."
            )
        for _, block in blocks[len(blocks) - last_n_blocks:]:
            for layer in block:
                targets.extend(leaves(layer))
    if layers is not None:
        try:
            pattern = re.compile(layers)
        except re.error as error:
            raise ValueError(
                f"layers={layers!r} is not a valid regex: {error}"
            ) from None
        matched = [layer for layer in all_layers(model)
                   if pattern.search(layer.name)]
        if not matched:
            raise ValueError(
                f"layers={layers!r} matches no layer of model {model.name!r}."
            )
        for layer in matched:
            targets.extend(leaves(layer))
    if batch_norm is None:
        batch_norm = batch_norm_policy(model, backbone) == "train"
    if not batch_norm:
        try:
            scope = find_backbone(model, backbone)
        except ValueError:
            scope = model
        in_scope = {id(layer) for layer in all_layers(scope)}
        targets = [
            t for t in targets
            if not (isinstance(t, keras.layers.BatchNormalization)
                    and id(t) in in_scope)
        ]
    _trainable_after(model, {id(t): True for t in targets})
    return len({id(t) for t in targets})


def set_trainable(model, spec, backbone=None):
    """Applies a stage's trainable spec to a kft model.

    Args:
        spec: `"head"` (backbone frozen, rest trainable), `"all"`,
            `"none"`, `"keep"` (leave the flags as they are, e.g. as
            `kft.lora.apply_lora` or `kft.prompt.prompt_tune` set them),
            `{"last_n_blocks": k}` (head + top k blocks) or
            `{"layers": regex}` (head + matching layers).
    """
    spec = parse_trainable(spec)
    if spec == "keep":
        return
    if spec == "all":
        set_trainable_flag(model, True)
        if batch_norm_policy(model, backbone) == "frozen":
            _freeze_backbone_batch_norm(model, backbone)
        return
    if spec == "none":
        set_trainable_flag(model, False)
        return
    set_trainable_flag(model, True)
    set_trainable_flag(find_backbone(model, backbone), False)
    if spec == "head":
        return
    unfreeze(model, backbone=backbone, **spec)


def trainable_summary(model, backbone=None):
    """Per block (and the head): layers, parameters, what trains.

    Returns:
        A list of dicts with keys `block`, `layers`, `params`,
        `trainable_params`, `state` (`"trainable"`, `"partial"` or
        `"frozen"`).
    """
    rows = []

    def row(name, layer_list):
        params = count_params(w for layer in layer_list for w in layer.weights)
        if params == 0:
            return
        train = count_params(w for layer in layer_list for w in layer.trainable_weights)
        weighted = [
            leaf for layer in layer_list for leaf in leaves(layer) if leaf.weights
        ]
        if train == 0:
            state = "frozen"
        elif all(leaf.trainable for leaf in weighted):
            state = "trainable"
        else:
            state = "partial"
        rows.append(
            {"block": name, "layers": len(layer_list), "params": params,
             "trainable_params": train, "state": state}
        )

    base = None
    try:
        base = find_backbone(model, backbone)
    except ValueError:
        pass
    others = [layer for layer in model.layers if layer is not base
              and not isinstance(layer, keras.layers.InputLayer)]
    if base is not None and not any(layer is base for layer in model.layers):
        # The backbone sits deeper (a task inside a wrapper, such as
        # kft.sft.SFTCausalLM): the head is what lies outside it.
        others = head_layers(model, backbone)
    if base is not None:
        base_on = base.trainable
        for name, block in backbone_blocks_of(model, backbone):
            if not base_on:
                params = count_params(w for layer in block for w in layer.weights)
                if params:
                    rows.append({"block": name, "layers": len(block),
                                 "params": params, "trainable_params": 0,
                                 "state": "frozen"})
                continue
            row(name, block)
    row("head", others)
    return rows


def format_trainable_summary(model, backbone=None):
    """Returns `trainable_summary` as a text table with a total line."""
    rows = trainable_summary(model, backbone)
    lines = [f"{'block':<28}{'layers':>7}{'params':>12}{'trainable':>12}  state"]
    for r in rows:
        lines.append(
            f"{r['block']:<28}{r['layers']:>7}{r['params']:>12,}"
            f"{r['trainable_params']:>12,}  {r['state']}"
        )
    total = count_params(model.weights)
    train = count_params(model.trainable_weights)
    share = 100.0 * train / total if total else 0.0
    lines.append(f"trainable: {train:,} of {total:,} parameters ({share:.1f}%)")
    return "\n".join(lines)
