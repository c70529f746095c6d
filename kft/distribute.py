"""Multi-device training on the engines that exist: `tf.distribute`.

kft builds no distribution of its own. A recipe's `distribution:` (or
`fine_tune(..., strategy=)`) names a TensorFlow strategy; the model,
optimizers (per-group ones included), LoRA layers and unfreezing all live
in its scope. The data's batch size is the global batch, split across
replicas; learning rates are used as given.
"""

__all__ = ["STRATEGIES", "make_strategy", "split_cpu"]

STRATEGIES = ("none", "mirrored", "multi_worker", "tpu")


def make_strategy(name="none", devices=None):
    """A `tf.distribute` strategy by name.

    Args:
        name: `"none"` (the default strategy: one device), `"mirrored"`
            (`MirroredStrategy`: every local GPU, or `devices`),
            `"multi_worker"` (`MultiWorkerMirroredStrategy`, cluster from
            the `TF_CONFIG` environment variable) or `"tpu"` (`TPUStrategy`
            on the TPU the environment provides, as in Colab).
        devices: for `"mirrored"`, the devices to use, e.g.
            `["/gpu:0", "/gpu:1"]` (or two logical CPUs, `split_cpu`).

    Returns:
        A `tf.distribute.Strategy`.
    """
    import keras
    import tensorflow as tf

    if name not in STRATEGIES:
        raise ValueError(
            f"Unknown distribution strategy {name!r}. Allowed: {list(STRATEGIES)}")
    if name != "none" and keras.backend.backend() != "tensorflow":
        raise ValueError(
            f"distribution {name!r} uses tf.distribute, which needs the "
            f"TensorFlow backend (KERAS_BACKEND={keras.backend.backend()}). On "
            "JAX use keras.distribution.DataParallel directly.")
    if devices is not None and name != "mirrored":
        raise ValueError("devices= applies to the 'mirrored' strategy only.")
    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.NotFoundError) as error:
        raise RuntimeError(f"distribution 'tpu': no TPU found ({error}).") from None
    return tf.distribute.TPUStrategy(resolver)


def split_cpu(count=2):
    """Splits the CPU into `count` logical devices, to try multi-device
    training without GPUs. Call before TensorFlow starts using devices.

    Returns:
        The logical CPU device names, e.g. `["/cpu:0", "/cpu:1"]`.
    """
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        raise RuntimeError(
            "split_cpu must run before TensorFlow initialises its devices "
            "(before any model or tensor is created).") from None
    return [f"/cpu:{i}" for i in range(count)]
