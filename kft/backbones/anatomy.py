"""What a model is: its task, backbone, blocks, head and BatchNorm policy.

kft's builders record an `Anatomy` on the model they return
(`kft.build_classifier` saves it in the model's config, so it survives
`.keras` save/load and `safe_mode=True`; keras-hub tasks carry the same
facts in their own config: `backbone`, `num_classes`, `activation`).
Freezing, per-layer learning rates, gradual unfreezing, LoRA, prompt
tuning, `fine_tune` and the report read it through `describe(model)`.

For a model kft did not build (the user's own Keras model, or a file
saved by an older kft), `infer_anatomy` is the one place that works the
facts out from the layers.
"""

import dataclasses
import math
import re
import sys

import keras

from kft._keras_internals import all_layers
from kft._keras_internals import child_layers
from kft.backbones import families

__all__ = [
    "Anatomy",
    "RecordsAnatomy",
    "backbone_blocks_of",
    "count_params",
    "describe",
    "family_entry",
    "find_backbone",
    "head_layers",
    "infer_anatomy",
    "is_keras_hub_backbone",
    "split_backbone",
]

TASKS = ("image_classifier", "text_classifier", "audio_classifier", "causal_lm",
         "object_detector", "image_segmenter", "task", "model")
HEAD_OUTPUT = "head_output"
_TRANSFORMER_LAYER = re.compile(r"transformer_layer_(\d+)$")


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """The facts about a model that kft's tools need.

    Args:
        task: one of `"image_classifier"`, `"text_classifier"`,
            `"causal_lm"`, `"object_detector"`, `"image_segmenter"`
            (`kft.vision`), `"task"` (another keras-hub task) or `"model"`
            (nothing known).
        backbone: the name of the backbone layer inside the model.
        family: the backbone family: a `kft.families` name
            (`"mobilenet_v2"`) or a keras-hub backbone class name
            (`"BertBackbone"`); it picks the block splitter.
        head_kind: `"multiclass"`, `"binary"`, `"multilabel"`,
            `"regression"` or None.
        logits: whether the outputs are logits (no final activation).
        batch_norm: `"frozen"`: the backbone's BatchNorm layers stay in
            inference mode whatever unfreezes; `"train"`: they train with
            their block.
    """

    task: str = "model"
    backbone: str | None = None
    family: str | None = None
    head_kind: str | None = None
    logits: bool = False
    batch_norm: str = "train"

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}. Received: "
                             f"task={self.task!r}")
        if self.batch_norm not in ("frozen", "train"):
            raise ValueError("batch_norm must be 'frozen' or 'train'. "
                             f"Received: batch_norm={self.batch_norm!r}")

    def get_config(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def family_entry(layer, table, missing=None):
    """`table[name]` for the first class along `type(layer).__mro__` whose
    name is a key (a LoRA container subclass keeps its base's entry).

    Without an entry: None, or a `ValueError(missing)` when `missing` (a
    sentence) is given."""
    for cls in type(layer).__mro__:
        if cls.__name__ in table:
            return table[cls.__name__]
    if missing is not None:
        raise ValueError(missing)
    return None


def count_params(variables):
    """The number of scalars in `variables`."""
    return int(sum(math.prod(v.shape) for v in variables))


def is_keras_hub_backbone(layer):
    """Whether `layer` is a keras-hub `Backbone` (whose config holds
    hyperparameters, not sublayers). Never imports keras-hub."""
    keras_hub = sys.modules.get("keras_hub")
    return keras_hub is not None and isinstance(layer, keras_hub.models.Backbone)


def _keras_hub_task(model):
    keras_hub = sys.modules.get("keras_hub")
    if keras_hub is None or not isinstance(model, keras_hub.models.Task):
        return None
    return keras_hub


def describe(model):
    """The model's `Anatomy`: the one its builder recorded, else inferred."""
    record = getattr(model, "anatomy", None)
    if isinstance(record, Anatomy):
        return record
    return infer_anatomy(model)


def infer_anatomy(model):
    """Works out the `Anatomy` of a model no kft builder recorded.

    keras-hub tasks describe themselves (`backbone`, `num_classes`,
    `activation`). A functional model is read by kft's conventions: a
    nested model named `"backbone"` (called with `training=False` for a
    frozen BatchNorm policy) and an output layer `"head_output"`; its
    family is the registered family whose block names fit its layers best.
    Other models: the first layer holding `transformer_layer_N` layers is
    the backbone; else nothing is known.
    """
    keras_hub = _keras_hub_task(model)
    if keras_hub is not None:
        return _task_anatomy(model, keras_hub)
    names = {layer.name: layer for layer in child_layers(model)}
    if "backbone" in names:
        base = names["backbone"]
        return Anatomy(
            task="image_classifier" if HEAD_OUTPUT in names else "model",
            backbone="backbone", family=_guess_family(base),
            head_kind=_head_kind(names.get(HEAD_OUTPUT)),
            batch_norm=_batch_norm_from_graph(model))
    for layer in all_layers(model):
        if any(_TRANSFORMER_LAYER.search(c.name) for c in child_layers(layer)):
            return Anatomy(backbone=layer.name, family=type(layer).__name__)
    return Anatomy()


def _task_anatomy(model, keras_hub):
    base = getattr(model, "backbone", None)
    activation = getattr(model, "activation", None)
    activation = keras.activations.serialize(activation) if activation else None
    if isinstance(model, keras_hub.models.CausalLM):
        task, kind, logits = "causal_lm", None, True
    elif getattr(model, "num_classes", None):
        kind = "multiclass"
        logits = activation in (None, "linear")
        task = ("text_classifier" if isinstance(model, keras_hub.models.TextClassifier)
                else "image_classifier"
                if isinstance(model, keras_hub.models.ImageClassifier) else "task")
    else:
        task, kind, logits = "task", None, False
    return Anatomy(task=task, backbone=base.name if base is not None else None,
                   family=type(base).__name__ if base is not None else None,
                   head_kind=kind, logits=logits)


def _head_kind(output):
    """The head kind of a kft output layer, from its activation and units."""
    if output is None:
        return None
    activation = keras.activations.serialize(output.activation)
    if isinstance(activation, dict):
        activation = activation.get("config", {}).get("name", activation)
    if activation == "softmax":
        return "multiclass"
    if activation == "sigmoid":
        return "binary" if output.units == 1 else "multilabel"
    return "regression"


def _batch_norm_from_graph(model):
    """`"frozen"` when the saved graph calls the backbone with
    `training=False` (kft models saved before the anatomy record)."""
    try:
        layers = model.get_config().get("layers", [])
    except (NotImplementedError, TypeError, AttributeError):
        return "train"
    for layer in layers:
        if layer.get("name") != "backbone":
            continue
        for node in layer.get("inbound_nodes", []):
            if isinstance(node, dict) and node.get("kwargs", {}).get(
                    "training") is False:
                return "frozen"
    return "train"


def _guess_family(base):
    """The registered family whose block splitter recognises most of the
    backbone's layer names (None when none does)."""
    best, best_score = None, 0.0
    for name in families.list_backbones():
        score = families.get_backbone(name).splitter.score(base)
        if score > best_score:
            best, best_score = name, score
    return best


def find_backbone(model, name=None):
    """The backbone layer of `model`.

    Args:
        model: a model kft built, a keras-hub task, or a model with a
            nested layer called `name`.
        name: the backbone layer's name; default: the model's anatomy.
    """
    anatomy_name = describe(model).backbone
    for candidate in dict.fromkeys(n for n in (name, anatomy_name) if n):
        task_backbone = getattr(model, "backbone", None)
        if (isinstance(task_backbone, keras.layers.Layer)
                and task_backbone.name == candidate):
            return task_backbone
        for layer in all_layers(model):
            if layer.name == candidate:
                return layer
        if name not in (None, "backbone"):
            break  # an explicit name that is not there: no fallback
    raise ValueError(
        f"Model {model.name!r} has no backbone kft recognises"
        + (f" (no layer named {name!r})" if name else "")
        + ". Build it with kft.build_classifier or kft.build_text_classifier, "
        "or pass backbone=<name of the nested backbone layer>.")


def split_backbone(base, family=None):
    """A backbone's layers as ordered `(block_name, layers)` pairs.

    keras-hub image backbones (`family` a class name in
    `kft.families.KERAS_HUB_SPLITTERS`): their table entry. keras-hub text
    transformers: `embeddings` (what comes before the first transformer
    layer), each `transformer_layer_i`, then `top` (a pooler, a final
    norm) when there is one. CNNs: the family's block splitter (`family` a
    `kft.families` name; guessed from layer names if None).
    """
    if family in families.KERAS_HUB_SPLITTERS:
        return families.KERAS_HUB_SPLITTERS[family].split(base)
    children = [c for c in child_layers(base)
                if not isinstance(c, keras.layers.InputLayer)]
    if any(_TRANSFORMER_LAYER.search(c.name) for c in children):
        return _transformer_blocks(children)
    if family is None or family not in families.list_backbones():
        family = _guess_family(base)
    splitter = (families.get_backbone(family).splitter if family
                else families.BlockSplitter())
    return splitter.split(base)


def _transformer_blocks(children):
    blocks, before, after = [], [], []
    for layer in children:
        match = _TRANSFORMER_LAYER.search(layer.name)
        if match:
            blocks.append((int(match.group(1)), layer.name, [layer]))
        elif blocks:
            after.append(layer)
        else:
            before.append(layer)
    blocks.sort()
    named = [("embeddings", before)] + [(n, ls) for _, n, ls in blocks]
    if after:
        named.append(("top", after))
    return [(n, ls) for n, ls in named if any(layer.weights for layer in ls)]


def backbone_blocks_of(model, backbone=None):
    """`(name, layers)` blocks of the backbone inside `model`, input to
    output: CNN blocks, or a keras-hub transformer's embeddings, each
    `transformer_layer_i` and the pooler. `backbone`: the nested
    backbone layer's name (default: the model's anatomy). For a bare
    backbone, `kft.backbones.named_backbone_blocks`."""
    base = find_backbone(model, backbone)
    return split_backbone(base, describe(model).family)


def head_layers(model, name=None):
    """The weighted leaf layers outside the backbone (the head)."""
    try:
        base = find_backbone(model, name)
    except ValueError:
        return []
    inside = {id(x) for x in all_layers(base, include_self=True)}
    return [layer for layer in all_layers(model)
            if id(layer) not in inside and layer.weights
            and not child_layers(layer)]


class RecordsAnatomy:
    """Mixin for a Keras model that records its `Anatomy`: `anatomy=` (an
    `Anatomy` or its config) is kept in `get_config`, so it survives
    `model.save` / `keras.saving.load_model(..., safe_mode=True)`
    (`kft.models.Classifier`, `kft.vision.Detector`, `kft.vision.Segmenter`)."""

    def __init__(self, *args, anatomy=None, **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(anatomy, dict):
            anatomy = Anatomy.from_config(anatomy)
        self.anatomy = anatomy

    def get_config(self):
        config = super().get_config()
        if self.anatomy is not None:
            config["anatomy"] = self.anatomy.get_config()
        return config
