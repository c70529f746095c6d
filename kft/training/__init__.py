"""Training: `fine_tune` runs stages (`Stage`: what trains, optimizer, rates,
epochs) with plain `model.fit`.

- `finetune`: `fine_tune` and the plan of its stages; `stages`: `Stage`;
- `optimizers`: discriminative, layer-wise decay and LoRA+ rates on
  `MultiOptimizer` (public as `kft.optimizers`);
- `stage_optimizers`: the optimizer a stage asks for;
- `callbacks`: gradual unfreezing, the learning-rate finder, non-finite
  loss guards (public as `kft.callbacks`);
- `report`: metrics files and plots; `memory_plan`: `plan_memory`.

Imports: `kft.backbones`, `kft.losses`, `kft.lora`, `kft.models`, `kft.sft`,
`kft.utils`.
"""

from kft._lazy import attach

_EXPORTS = {
    "fine_tune": "kft.training.finetune",
    "plan_memory": "kft.training.memory_plan",
    "Stage": "kft.training.stages",
}
__getattr__, __dir__, __all__ = attach(__name__, _EXPORTS)
