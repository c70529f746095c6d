"""Every use of a Keras (or TensorFlow) private attribute in kft, in one place.

Keras offers no public way to do what these helpers do. Each says why kft
needs it, and each was checked against Keras 3.15.0 and 3.15.1 (the
versions kft tests on). When a Keras release changes one of them, this is
the only module to mend, and `tests/test_layering.py` makes sure no other
kft module reaches for a private attribute of a Keras object.
"""

import contextlib

import keras

__all__ = [
    "all_layers",
    "child_layers",
    "distribute_strategy",
    "freeze_variable",
    "grouped_int4_kernel",
    "kernel_variable",
    "mark_trainable_state_compiled",
    "one_gc_collect",
    "op_determinism",
    "optimizer_map",
    "optimizer_rate",
    "own_trainable_variables",
    "requantized_kernel",
    "set_trainable_flag",
    "trainable_variable_lists",
    "tracked_dataset",
    "unlocked_tracker",
    "WEIGHT_DECAY_ATTRIBUTES",
]

# `Layer.trainable`'s setter, called directly. On the TensorFlow backend
# `layer.trainable = value` is skipped when the flag already equals `value`,
# even if sublayers differ (a frozen backbone inside a model whose own flag
# is True stays frozen); the Layer property setter always recurses.
_SET_TRAINABLE = keras.layers.Layer.trainable.fset


def set_trainable_flag(layer, value):
    """`layer.trainable = value` that always reaches every sublayer."""
    _SET_TRAINABLE(layer, bool(value))
    return layer


def child_layers(layer):
    """The layers directly inside `layer` (not their children).

    `Layer._flatten_layers` is the only accessor that works for every
    layer, functional models and keras-hub backbones alike (`Model.layers`
    exists on models only, and lists a functional model's InputLayers).
    """
    return list(layer._flatten_layers(include_self=False, recursive=False))


def all_layers(layer, include_self=False):
    """Every layer inside `layer`, depth first (`Layer._flatten_layers`)."""
    return list(layer._flatten_layers(include_self=include_self))


def own_trainable_variables(layer):
    """The trainable variables `layer` itself created, whatever its flag.

    `Layer.trainable_weights` is empty for a frozen layer; gradual
    unfreezing must count the weights a block *would* train
    (`Layer._trainable_variables`).
    """
    return list(layer._trainable_variables)


def trainable_variable_lists(layer):
    """`(trainable, non_trainable)`: the layer's own variable lists, which
    LoRA edits to turn a pretrained kernel into a frozen one."""
    return layer._trainable_variables, layer._non_trainable_variables


@contextlib.contextmanager
def unlocked_tracker(layer):
    """Lets a built layer take new variables (LoRA adds A and B to a
    pretrained Dense): Keras locks `Layer._tracker` after `build`."""
    layer._tracker.unlock()
    try:
        yield layer
    finally:
        layer._tracker.lock()


def kernel_variable(layer):
    """The kernel variable of a Dense / EinsumDense (`layer.kernel` is a
    property that merges Keras' own LoRA; kft needs the variable)."""
    return layer._kernel


def grouped_int4_kernel(layer):
    """The float kernel of a sub-channel (grouped) int4 Dense / EinsumDense,
    or None for any other layer.

    In the compute dtype and the layer's unpacked kernel shape, computed as
    Keras' own `_int4_call` dequantizes it for its float matmul (unpack the
    packed `_kernel` along its last axis; `(q - zero[g]) * scale[g]` with
    the group `g = g_idx` of each input row; EinsumDense: then reshaped to
    `original_kernel_shape`), so that kft's fused QLoRA step
    (`kft.lora.fused`) can dequantize once and use the result in both the
    forward and the backward pass (Keras dequantizes in each). A test
    compares it with Keras' own quantized output.
    """
    zero, groups = (getattr(layer, "kernel_zero", None),
                    getattr(layer, "g_idx", None))
    if layer.quantization_mode != "int4" or zero is None or groups is None:
        return None
    einsum = isinstance(layer, keras.layers.EinsumDense)
    columns = (layer._int4_unpacked_column_size if einsum
               else layer._orig_output_dim)
    ops = keras.ops
    unpacked = keras.quantizers.unpack_int4(
        ops.convert_to_tensor(layer._kernel), columns, axis=-1, dtype="int8")
    groups = ops.cast(ops.convert_to_tensor(groups), "int32")
    scale = ops.take(ops.convert_to_tensor(layer.kernel_scale), groups, axis=0)
    zero = ops.cast(ops.take(ops.convert_to_tensor(zero), groups, axis=0),
                    scale.dtype)
    kernel = ops.cast(ops.multiply(ops.subtract(unpacked, zero), scale),
                      layer.compute_dtype)
    return ops.reshape(kernel, layer.original_kernel_shape) if einsum else kernel


def mark_trainable_state_compiled(model):
    """Tells Keras the current trainable flags are compiled in.

    After an in-fit unfreeze (train function rebuilt), Keras would warn at
    the next `evaluate()` that flags changed since `compile`
    (`Model._compiled_trainable_state`).
    """
    if hasattr(model, "_compiled_trainable_state"):
        model._compiled_trainable_state = {
            layer: layer.trainable for layer in all_layers(model, True)
        }


def distribute_strategy(model):
    """The `tf.distribute` strategy a model was built under, or None
    (`Model._distribute_strategy`, set by the TensorFlow trainer)."""
    return getattr(model, "_distribute_strategy", None)


# Optimizer attributes that `get_config()` leaves out (weight-decay
# exclusions) and that kft copies when it rebuilds an optimizer in fit.
WEIGHT_DECAY_ATTRIBUTES = (
    "_exclude_from_weight_decay",
    "_exclude_from_weight_decay_pattern",
    "_exclude_from_weight_decay_names",
)


def optimizer_map(optimizer):
    """The `keras.optimizers.OptimizerMap` of a `MultiOptimizer` (given to
    its constructor and kept as `_optimizer_map`, with no public getter)."""
    return optimizer._optimizer_map


def optimizer_rate(optimizer):
    """An optimizer's learning rate as given: a number or a schedule
    (`optimizer.learning_rate` evaluates schedules; kft describes them)."""
    return optimizer._learning_rate


@contextlib.contextmanager
def op_determinism(enabled):
    """TensorFlow op determinism for the duration of a `with` block.

    TensorFlow offers `tf.config.experimental.enable_op_determinism()` but
    no public way to read or undo it; `tensorflow.python.framework.config`
    has both (checked on TensorFlow 2.20 and 2.21). A deterministic run
    must not leave a notebook deterministic (and slower) after it ends.
    """
    if not enabled:
        yield
        return
    from tensorflow.python.framework import config

    was_enabled = config.is_op_determinism_enabled()
    config.enable_op_determinism()
    try:
        yield
    finally:
        if not was_enabled:
            config.disable_op_determinism()


def requantized_kernel(layer, delta):
    """`(kernel, kernel_scale, kernel_zero)` of an int8 / int4 Dense or
    EinsumDense whose kernel gets the float `delta` (in the kernel's
    unpacked shape) added, requantized exactly as Keras requantizes.

    Keras' own LoRA merge (`_get_kernel_with_merged_lora`, which Keras
    runs when it saves a LoRA-enabled quantized layer) dequantizes the
    kernel, adds `lora_alpha / lora_rank * lora_kernel_a @ lora_kernel_b`
    and requantizes with the layer's settings (int4 block size, EinsumDense
    scale layout: `_adjust_scale_for_dequant`). kft runs it on a stand-in
    that reads every attribute from `layer` except Keras' LoRA ones, which
    carry `delta` as `delta @ I` (exact in float32; TF32 on a GPU may round
    `delta` to 10 mantissa bits, far below an int8 step). `layer` itself is
    not changed; `kernel_zero` is None unless int4 has groups. Checked on
    Keras 3.15.1.
    """
    lora = {"lora_enabled": True, "lora_rank": 1, "lora_alpha": 1.0,
            "lora_kernel_a": delta,
            "lora_kernel_b": keras.ops.eye(delta.shape[-1], dtype="float32")}

    class StandIn:
        def __getattr__(self, name):
            return lora[name] if name in lora else getattr(layer, name)

    plain = keras.layers.EinsumDense if isinstance(
        layer, keras.layers.EinsumDense) else keras.layers.Dense
    return plain._get_kernel_with_merged_lora(StandIn())


def freeze_variable(layer, variable):
    """Makes one of `layer`'s own variables non-trainable and files it
    under the layer's non-trainable variables, through `Layer._tracker`.

    Moving it between the two lists by hand leaves the tracker's record
    pointing at the trainable list, so a later `del` (Keras' `quantize()`
    deletes the float kernel of a LoRA layer quantized after `apply_lora`)
    would leave the float kernel in `layer.weights`. Checked on Keras
    3.15.1.
    """
    tracker = layer._tracker
    variable.trainable = False
    if tracker.is_in_store("trainable_variables", variable):
        was_locked = tracker.locked
        tracker.unlock()
        try:
            tracker.untrack(variable)
            tracker.add_to_store("non_trainable_variables", variable)
        finally:
            if was_locked:
                tracker.lock()
    return variable


def embeddings_variable(layer):
    """The table variable of an Embedding (`Embedding.embeddings` is a
    property that unpacks int4 and merges Keras' own LoRA; kft's LoRA
    layers need the variable itself, to freeze it and to merge into it).
    `Embedding._embeddings`, checked on Keras 3.15.1."""
    return layer._embeddings


__all__ += ["embeddings_variable"]


@contextlib.contextmanager
def one_gc_collect():
    """One `gc.collect()` for a block that deletes many variables.

    `Layer.__delattr__` runs a full `gc.collect()` for every variable a
    layer deletes (checked on Keras 3.15.1); quantizing or merging a
    135M-parameter LM deletes hundreds, at up to seconds each when the
    heap is large. Collect once at the end instead.
    """
    import gc

    collect = gc.collect
    gc.collect = lambda *args, **kwargs: 0
    try:
        yield
    finally:
        gc.collect = collect
        gc.collect()


__all__ += ["before_keras_download"]


@contextlib.contextmanager
def before_keras_download(check):
    """Calls `check(url)` before Keras downloads a file inside the block.

    `keras.applications` weights and `keras.datasets` go through
    `keras.src.utils.file_utils.get_file`, which looks in Keras' cache
    (`~/.keras`) and only then calls the module's `urlretrieve`. Wrapping
    that call runs `check` exactly when a download would start (a cached
    file never reaches it); `check` raises to stop it. Checked on Keras
    3.15.0 and 3.15.1; without the attribute the block runs unguarded.
    """
    from keras.src.utils import file_utils

    retrieve = getattr(file_utils, "urlretrieve", None)
    if retrieve is None:
        yield
        return

    def guarded(url, *args, **kwargs):
        check(url)
        return retrieve(url, *args, **kwargs)

    file_utils.urlretrieve = guarded
    try:
        yield
    finally:
        file_utils.urlretrieve = retrieve


def tracked_dataset(dataset):
    """`dataset` (a `tf.data.Dataset`) wrapped so that a run can resume at
    the same data position (see `TrackedDataset`)."""
    return _tracked_dataset_class()(dataset)


_TRACKED = []


class _StreamPosition:
    """Iterators made and batches drawn, shared by a `TrackedDataset` and
    the datasets derived from it with `map` / `prefetch` (keras-hub tasks
    map their preprocessor over the data inside `fit`)."""

    def __init__(self):
        self.iterators, self.drawn = 0, 0


def _tracked_dataset_class():
    """`TrackedDataset`, defined on first use (TensorFlow imports lazily)."""
    if _TRACKED:
        return _TRACKED[0]
    import tensorflow as tf

    class TrackedDataset(tf.data.Dataset):
        """A `tf.data.Dataset` that counts the iterators made from it.

        A shuffled dataset (`shuffle(..., reshuffle_each_iteration=True)`)
        draws a new order for each iterator, from a seed generator that
        lives in the dataset: the k-th iterator of a fresh process gives
        the k-th epoch's order. Keras' `fit` makes iterators at known
        points (one per epoch; with `steps_per_epoch`, one kept across
        epochs), so a resumed run that first makes as many iterators as
        the interrupted one had sees the shuffle orders the interrupted
        run would have. (Batches already drawn from a kept stream cannot
        be skipped: Keras counts a pass's batches itself, and would run
        out mid-epoch.) There is no public way to observe `iter()` on a dataset;
        this subclass reuses the wrapped dataset's variant tensor
        (`Dataset._variant_tensor`, TensorFlow 2.20 and 2.21), so its
        iterators share the wrapped dataset's seed generator. `map` and
        `prefetch` keep the tracking (and the count) on what they return.

        Attributes:
            iterators: iterators made so far.
            drawn: batches drawn from the newest one (the caller counts
                them: `RunCheckpoint.on_train_batch_end`).
        """

        def __init__(self, dataset, position=None):
            self._wrapped = dataset
            self._position = position or _StreamPosition()
            super().__init__(dataset._variant_tensor)

        def _inputs(self):
            return [self._wrapped]

        @property
        def element_spec(self):
            return self._wrapped.element_spec

        @property
        def iterators(self):
            return self._position.iterators

        @property
        def drawn(self):
            return self._position.drawn

        @drawn.setter
        def drawn(self, value):
            self._position.drawn = value

        def map(self, *args, **kwargs):
            return TrackedDataset(self._wrapped.map(*args, **kwargs),
                                  self._position)

        def prefetch(self, *args, **kwargs):
            return TrackedDataset(self._wrapped.prefetch(*args, **kwargs),
                                  self._position)

        def __iter__(self):
            iterator = super().__iter__()
            self._position.iterators += 1
            self._position.drawn = 0
            return iterator

        def fast_forward(self, iterators):
            """Makes (and drops) iterators until `iterators` have been
            made, so the next one draws the shuffle order it would have."""
            while self._position.iterators < iterators:
                super().__iter__()
                self._position.iterators += 1

    _TRACKED.append(TrackedDataset)
    return TrackedDataset


__all__ += ["preset_backbone_class"]


def preset_backbone_class(preset):
    """The keras-hub backbone class a preset (a name, `hf://` address or
    local directory, keras-hub or Hugging Face format) would load, read
    from its `config.json` alone (no weights).

    keras-hub's `Backbone.from_preset` finds it this way
    (`keras_hub.src.utils.preset_utils.get_preset_loader(preset)
    .check_backbone_class()`); there is no public call. kft needs the class
    before the model exists: model-parallel layouts apply as variables are
    created. Checked on keras-hub 0.32.
    """
    from keras_hub.src.utils.preset_utils import get_preset_loader

    return get_preset_loader(preset).check_backbone_class()
