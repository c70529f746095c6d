"""`tf.distribute` strategies by name (`none`, `mirrored`,
`multi_worker`, `tpu`), and the collective timeout a `multi_worker` run
keeps (`KFT_COLLECTIVE_TIMEOUT`); see `kft.distribute`.
"""

import os

from kft.distribute.mesh import KERAS_DISTRIBUTIONS

__all__ = ["COLLECTIVE_TIMEOUT_ENV", "STRATEGIES", "collective_timeout",
           "make_strategy", "split_cpu"]

STRATEGIES = ("none", "mirrored", "multi_worker", "tpu")
COLLECTIVE_TIMEOUT_ENV = "KFT_COLLECTIVE_TIMEOUT"

# TensorFlow configures collective ops once per process, before any tensor
# exists: the one MultiWorkerMirroredStrategy of this process.
_multi_worker = {}


def make_strategy(name="none", devices=None):
    """A `tf.distribute` strategy by name.

    Args:
        name: `"none"` (the default strategy: one device), `"mirrored"`
            (`MirroredStrategy`: every local GPU, or `devices`),
            `"multi_worker"` (`MultiWorkerMirroredStrategy`, cluster from
            the `TF_CONFIG` environment variable; one per process, made
            before any tensor: later calls return it) or `"tpu"` (`TPUStrategy`
            on the TPU the environment provides, as in Colab).
        devices: for `"mirrored"`, the devices to use, e.g.
            `["/gpu:0", "/gpu:1"]` (or two logical CPUs, `split_cpu`).

    Returns:
        A `tf.distribute.Strategy`.
    """
    import keras
    import tensorflow as tf

    if name in KERAS_DISTRIBUTIONS:
        raise ValueError(
            f"distribution {name!r} is a keras.distribution (JAX backend), not "
            "a tf.distribute strategy: use kft.distribute.keras_distribution.")
    if name not in STRATEGIES:
        raise ValueError(
            f"Unknown distribution strategy {name!r}. Allowed: {list(STRATEGIES)}")
    if name != "none" and keras.backend.backend() != "tensorflow":
        raise ValueError(
            f"distribution {name!r} uses tf.distribute, which needs the "
            f"TensorFlow backend (KERAS_BACKEND={keras.backend.backend()}). On "
            "JAX use distribution 'data_parallel' or 'model_parallel' "
            "(keras.distribution: kft.distribute.keras_distribution).")
    if devices is not None and name != "mirrored":
        raise ValueError("devices= applies to the 'mirrored' strategy only.")
    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        return _multi_worker_strategy()
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.NotFoundError) as error:
        raise RuntimeError(f"distribution 'tpu': no TPU found ({error}).") from None
    return tf.distribute.TPUStrategy(resolver)


def collective_timeout():
    """Seconds a multi-worker collective may wait for its peers
    (`KFT_COLLECTIVE_TIMEOUT`), or None: no limit (unset, empty or 0).

    Off by default: a dead peer is already detected by heartbeats, and
    TensorFlow keeps a sleeping thread per collective for the whole
    timeout (thousands of threads on a fast GPU step), so set it to
    diagnose a hang rather than for every run.
    """
    value = os.environ.get(COLLECTIVE_TIMEOUT_ENV, "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ValueError(
            f"{COLLECTIVE_TIMEOUT_ENV} must be a number of seconds >= 0 (0: no "
            f"limit). Received: {COLLECTIVE_TIMEOUT_ENV}={value!r}.")
    return seconds or None


def _multi_worker_strategy():
    """The process's `MultiWorkerMirroredStrategy`, created on first use."""
    import tensorflow as tf

    class MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        """Reduces as Keras 3's `fit` asks (keras-team/keras#20585).

        Keras reduces a whole `(x, y)` batch in one call (this strategy
        reduces single values; `MirroredStrategy` maps over the structure)
        and each replica's scalar metrics with `axis=0` (a scalar has no
        axis 0: the mean over replicas is meant).
        """

        def reduce(self, reduce_op, value, axis):
            parent = super()

            def reduce_one(v):
                rank = self.experimental_local_results(v)[0].shape.rank
                return parent.reduce(reduce_op, v, None if rank == 0 else axis)

            return tf.nest.map_structure(reduce_one, value)

    if "strategy" not in _multi_worker:
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=collective_timeout())
        try:
            _multi_worker["strategy"] = MultiWorkerMirroredStrategy(
                communication_options=options)
        except RuntimeError as error:
            if "startup" not in str(error):
                raise
            raise RuntimeError(
                "distribution 'multi_worker': TensorFlow sets up a worker's "
                "collective ops once, before any tensor exists. Call "
                "kft.distribute.make_strategy('multi_worker') first thing in "
                "the program (before building data or models).") from None
    return _multi_worker["strategy"]


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
