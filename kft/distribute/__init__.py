"""Multi-device training on the engines that exist: `tf.distribute` on
TensorFlow (`strategy`), `keras.distribution` on JAX (`mesh`:
`data_parallel`, `model_parallel`).

kft builds no distribution of its own. A recipe's `distribution:` (or
`fine_tune(..., strategy=)`) names a TensorFlow strategy; the model,
optimizers (per-group ones included), LoRA layers and unfreezing all live
in its scope. The data's batch size is the global batch, split across
replicas; learning rates are used as given.

`multi_worker` trains one replica set per process, the cluster given by
`TF_CONFIG`. A worker whose peer dies fails within seconds (TensorFlow's
coordination service misses the peer's heartbeats, or its connection
drops); `KFT_COLLECTIVE_TIMEOUT` (seconds, off by default) also bounds a
collective whose peer is alive but stuck.

Imports: `kft.lora`, `kft.models`.
"""

from kft._lazy import attach

_EXPORTS = {
    "check_mesh": "kft.distribute.mesh",
    "collective_timeout": "kft.distribute.strategy",
    "COLLECTIVE_TIMEOUT_ENV": "kft.distribute.strategy",
    "device_mesh": "kft.distribute.mesh",
    "keras_distribution": "kft.distribute.mesh",
    "KERAS_DISTRIBUTIONS": "kft.distribute.mesh",
    "layout_map": "kft.distribute.mesh",
    "make_distribution": "kft.distribute.mesh",
    "make_strategy": "kft.distribute.strategy",
    "MESH_AXES": "kft.distribute.mesh",
    "split_cpu": "kft.distribute.strategy",
    "STRATEGIES": "kft.distribute.strategy",
}
__getattr__, __dir__, __all__ = attach(__name__, _EXPORTS)
