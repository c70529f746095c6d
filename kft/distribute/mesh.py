"""Multi-device training on JAX: `keras.distribution`, by name.

The TensorFlow side of `kft.distribute` names `tf.distribute` strategies;
this is the JAX side (re-exported there). Two names:

- `"data_parallel"`: `keras.distribution.DataParallel`. Every weight is
  replicated on every device, each batch is split across them along the
  `batch` axis, and XLA (GSPMD) reduces the gradients: one program over
  the global batch, so the loss and the weights match one device up to
  float rounding (BatchNorm statistics included).
- `"model_parallel"`: `keras.distribution.ModelParallel` on a 2-D mesh
  `{batch: b, model: m}` with the layout map keras-hub ships for its LLMs
  (`<Backbone>.get_layout_map(mesh)`: Llama, Llama 3, Gemma, Qwen, Qwen 2,
  Qwen MoE ...). The weights it names are split across the devices;
  everything else is replicated.

What kft adds to Keras' classes:

- Layouts that fit the variable. keras-hub's maps split e.g. the token
  embedding over both axes and the query kernel's heads over `batch`; a
  dimension that does not divide by its mesh axis (SmolLM2's 9 heads on 2
  devices, a 267-token test vocabulary) would make JAX refuse to place the
  weight. That dimension is replicated instead (logged; the distribution's
  `relaxed` lists each `path: (asked, used)`).
- LoRA weights are replicated, not sharded like their base kernel, on
  purpose: `A` is `(fan_in, r)` and `B` `(r, fan_out)` with a rank of
  8-64, under 1% of the kernel, so splitting them saves next to no memory,
  while their rank axis cannot be split and an EinsumDense kernel's
  layout does not carry over to the flattened `(fan_in, fan_out)` view.
  Replicated, they train like data-parallel weights (gradients reduced
  over the batch axis) next to the sharded frozen base.
- Meshes checked against the devices that exist, with one clear error.

The distribution must be current while the model is built (variables are
placed when created) and while it trains: `keras_distribution` sets it and
puts the previous one back.
"""

import contextlib
import logging
import math
import os

__all__ = [
    "KERAS_DISTRIBUTIONS",
    "MESH_AXES",
    "check_mesh",
    "device_mesh",
    "keras_distribution",
    "layout_map",
    "make_distribution",
]

KERAS_DISTRIBUTIONS = ("data_parallel", "model_parallel")
# Mesh axes, in mesh order. keras-hub's layout maps split weights over
# "model" (and, FSDP-like, over "batch"); batches are split over "batch".
MESH_AXES = ("batch", "model")
# What a tf.distribute name is, for the errors (kft.distribute.STRATEGIES).
_TF_STRATEGIES = ("none", "mirrored", "multi_worker", "tpu")

logger = logging.getLogger(__name__)


def _check_backend(name):
    import keras

    backend = keras.backend.backend()
    if backend != "jax":
        raise ValueError(
            f"distribution {name!r} uses keras.distribution, which kft runs on "
            f"the JAX backend only (KERAS_BACKEND={backend}). Set "
            "KERAS_BACKEND=jax, or on TensorFlow use a tf.distribute strategy: "
            "'mirrored' (the local GPUs), 'multi_worker' or 'tpu'.")


def check_mesh(name, mesh):
    """Checks a mesh given as `{axis: size}` for the distribution `name`
    (without looking at the devices: `device_mesh` does that).

    Args:
        name: `"data_parallel"` or `"model_parallel"`.
        mesh: None (the default: every device on one axis) or a dict of
            positive ints over `MESH_AXES`: `data_parallel` takes `batch`
            only; `model_parallel` needs `model` and may add `batch`.

    Raises:
        ValueError: naming the bad entry and what is allowed.
    """
    if name not in KERAS_DISTRIBUTIONS:
        raise ValueError(
            f"Unknown keras distribution {name!r}. Allowed: "
            f"{list(KERAS_DISTRIBUTIONS)} (tf.distribute strategies: "
            f"{list(_TF_STRATEGIES)}, kft.distribute.make_strategy).")
    if mesh is None:
        return
    if not isinstance(mesh, dict) or not mesh:
        raise ValueError("mesh must be a mapping of axis name to device count, "
                         f"e.g. {{batch: 2, model: 2}}. Received: mesh={mesh!r}")
    for axis, size in mesh.items():
        if axis not in MESH_AXES:
            raise ValueError(f"Unknown mesh axis {axis!r}. Allowed: "
                             f"{list(MESH_AXES)}. Received: mesh={mesh}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"mesh sizes must be integers >= 1. Received: "
                             f"mesh.{axis}={size!r}")
    if name == "data_parallel" and set(mesh) != {"batch"}:
        raise ValueError(
            "data_parallel replicates the model: its mesh has the batch axis "
            f"only (e.g. {{batch: 4}}; for a model axis use model_parallel). "
            f"Received: mesh={mesh}")
    if name == "model_parallel" and "model" not in mesh:
        raise ValueError(
            "model_parallel splits weights over the mesh's model axis: give "
            f"it, e.g. {{batch: 2, model: 2}}. Received: mesh={mesh}")


def device_mesh(name, mesh=None, *, devices=None):
    """A `keras.distribution.DeviceMesh` for the distribution `name`.

    Args:
        name: `"data_parallel"` or `"model_parallel"`.
        mesh: `{axis: size}` (see `check_mesh`). Default: every device on
            `batch` (data_parallel), or on `model` (model_parallel). The
            sizes must multiply to the number of devices.
        devices: the devices, e.g. `["cpu:0", "cpu:1"]`; default
            `keras.distribution.list_devices()` (every accelerator, else
            the CPU devices).

    Returns:
        A `DeviceMesh`: axes `("batch",)` for data_parallel, `("batch",
        "model")` (batch first) for model_parallel.
    """
    import keras

    check_mesh(name, mesh)
    devices = list(devices) if devices is not None else (
        keras.distribution.list_devices())
    count = len(devices)
    if name == "data_parallel":
        sizes = {"batch": (mesh or {}).get("batch", count)}
    else:
        given = mesh or {"model": count}
        sizes = {"batch": given.get("batch", 1), "model": given["model"]}
    if math.prod(sizes.values()) != count:
        product = " x ".join(f"{axis} {size}" for axis, size in sizes.items())
        shown = devices if count <= 8 else [*devices[:8], "..."]
        raise ValueError(
            f"distribution {name!r}: the mesh {sizes} spans {product} = "
            f"{math.prod(sizes.values())} devices, but {count} are available "
            f"({shown}). Give sizes that multiply to {count}. (On a CPU, "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N set before "
            "JAX starts gives N devices.)")
    return keras.distribution.DeviceMesh(
        shape=tuple(sizes.values()), axis_names=tuple(sizes), devices=devices)


def _backbone_class(model):
    """The keras-hub backbone class of a class, an instance, a task (a
    `CausalLM`, a `kft.sft.SFTCausalLM`) or a preset name / path."""
    if isinstance(model, (str, os.PathLike)):
        from kft._keras_internals import preset_backbone_class
        from kft.models.causal_lm import resolve_causal_lm_preset

        preset = os.path.expanduser(resolve_causal_lm_preset(os.fspath(model)))
        try:
            return preset_backbone_class(preset)
        except Exception as error:
            cause = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(
                f"model_parallel: cannot tell which keras-hub backbone "
                f"{preset!r} holds, to take its layout map: {cause}") from None
    if isinstance(model, type):
        return model
    backbone = getattr(model, "backbone", None)
    return type(backbone if backbone is not None else model)


def _families_with_layout_maps():
    import keras_hub

    return sorted(name for name in dir(keras_hub.models)
                  if name.endswith("Backbone")
                  and hasattr(getattr(keras_hub.models, name), "get_layout_map"))


def layout_map(model, mesh):
    """keras-hub's layout map for `model`'s backbone on `mesh`.

    Args:
        model: a keras-hub backbone class (`keras_hub.models.LlamaBackbone`)
            or instance, a task holding one (`CausalLM`, `SFTCausalLM`), or
            a preset name / `hf://` address / local directory (its config
            says the class; nothing is loaded).
        mesh: a `DeviceMesh` with axes `batch` and `model`.

    Returns:
        The `keras.distribution.LayoutMap` of `<Backbone>.get_layout_map`.
    """
    backbone = _backbone_class(model)
    get_layout_map = getattr(backbone, "get_layout_map", None)
    if get_layout_map is None:
        raise ValueError(
            f"model_parallel: keras-hub has no layout map for "
            f"{backbone.__name__}. Backbones with one: "
            f"{_families_with_layout_maps()}. Pass layout= a "
            "keras.distribution.LayoutMap of your own, or use data_parallel.")
    return get_layout_map(mesh, model_parallel_dim_name="model",
                          data_parallel_dim_name="batch")


def _fitted_model_parallel():
    """`ModelParallel` whose layouts fit each variable (see the module
    docstring), with LoRA weights replicated. A factory: `import kft` must
    not import Keras."""
    import keras

    from kft.lora.base import ADAPTER_VARIABLES

    class FittedModelParallel(keras.distribution.ModelParallel):
        def __init__(self, *, layout_map, batch_dim_name="batch"):
            super().__init__(layout_map=layout_map, batch_dim_name=batch_dim_name)
            self.relaxed = {}

        def get_variable_layout(self, variable):
            mesh = self.device_mesh
            replicated = keras.distribution.TensorLayout(
                [None] * len(variable.shape), mesh)
            if variable.path.rsplit("/", 1)[-1] in ADAPTER_VARIABLES:
                return replicated
            layout = super().get_variable_layout(variable)
            asked = tuple(layout.axes)
            if len(asked) != len(variable.shape):
                used = (None,) * len(variable.shape)
            else:
                used = tuple(
                    axis if axis is None or dim % _axis_size(mesh, axis) == 0
                    else None for axis, dim in zip(asked, variable.shape))
            if used == asked:
                return layout
            self.relaxed[variable.path] = (asked, used)
            log = logger.warning if len(self.relaxed) == 1 else logger.info
            log("model_parallel: %s %s cannot be split as the layout map asks "
                "(%s): a dimension does not divide by its mesh axis, so it is "
                "replicated along it (%s). Others like it are logged at INFO "
                "level and listed in the distribution's `relaxed`.",
                variable.path, tuple(variable.shape), asked, used)
            return keras.distribution.TensorLayout(used, mesh)

    return FittedModelParallel


def _axis_size(mesh, axis):
    names = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh.shape[mesh.axis_names.index(n)] for n in names)


def make_distribution(name, mesh=None, *, layout=None, devices=None):
    """A `keras.distribution.Distribution` by name (JAX backend).

    Args:
        name: `"data_parallel"` or `"model_parallel"`.
        mesh: `{axis: size}` (see `device_mesh`), e.g. `{"batch": 2,
            "model": 2}`; the sizes must multiply to the device count.
        layout: for model_parallel, where the layout map comes from: a
            keras-hub backbone class, model or task, or a preset name / path
            (see `layout_map`), or a `keras.distribution.LayoutMap` (which
            brings its own mesh: then give no `mesh`).
        devices: the devices (default: all of them).

    Returns:
        `DataParallel`, or a `ModelParallel` whose `relaxed` lists the
        weights left unsplit along an axis that does not divide them.

    Example:

    ```python
    distribution = kft.distribute.make_distribution(
        "model_parallel", {"batch": 2, "model": 2},
        layout=keras_hub.models.Llama3Backbone)
    with distribution.scope():
        lm = kft.build_causal_lm(checkpoint_dir)
        ...
    ```
    """
    import keras

    check_mesh(name, mesh)
    _check_backend(name)
    if name == "data_parallel":
        if layout is not None:
            raise ValueError("layout= is for model_parallel; data_parallel "
                             f"replicates every weight. Received: layout={layout!r}")
        return keras.distribution.DataParallel(
            device_mesh=device_mesh(name, mesh, devices=devices))
    if layout is None:
        raise ValueError(
            "model_parallel needs a layout map: pass layout= a keras-hub "
            "backbone class, model or preset (its get_layout_map is used) or "
            "a keras.distribution.LayoutMap. Received: layout=None")
    if isinstance(layout, keras.distribution.LayoutMap):
        if mesh is not None or devices is not None:
            raise ValueError("a LayoutMap brings its own device mesh: give no "
                             f"mesh / devices. Received: mesh={mesh}")
        layouts = layout
    else:
        layouts = layout_map(layout, device_mesh(name, mesh, devices=devices))
    return _fitted_model_parallel()(layout_map=layouts, batch_dim_name="batch")


@contextlib.contextmanager
def keras_distribution(name, mesh=None, *, layout=None, devices=None):
    """Makes a Keras distribution current, and the previous one again on exit.

    Build the model and train it inside: variables are placed when they
    are created, and `fit` splits each batch over the mesh's batch axis.
    For a tf.distribute name (`"none"`, `"mirrored"`, ...) it does nothing
    and yields None, so a recipe runner can enter it whatever the name.

    Args:
        name: as for `make_distribution`.
        mesh: as for `make_distribution`.
        layout: as for `make_distribution`.
        devices: as for `make_distribution`.

    Yields:
        The distribution (None for a tf.distribute name).

    Example:

    ```python
    with kft.distribute.keras_distribution("data_parallel") as distribution:
        model = kft.build_classifier("mobilenet_v2", 5, weights="imagenet")
        kft.fine_tune(model, train, val, stages=[...])
    ```
    """
    import keras

    if name in _TF_STRATEGIES:
        if mesh is not None:
            raise ValueError(f"mesh applies to {list(KERAS_DISTRIBUTIONS)} "
                             f"only. Received: distribution {name!r}, mesh={mesh}")
        yield None
        return
    distribution = make_distribution(name, mesh, layout=layout, devices=devices)
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(distribution)
    try:
        yield distribution
    finally:
        keras.distribution.set_distribution(previous)
