"""Pretrained backbones and what kft knows of their structure.

- `blocks`: the backbone registry (`register_backbone`, `list_backbones`,
  `build_backbone`) and a backbone's blocks, bottom to top;
- `families`: per-family tables (block splitters, packaged weights,
  preprocessing modes); `image_presets`: keras-hub / timm image presets;
- `preprocessing`: `ImagePreprocessing`, the layer that puts a backbone's
  own input scaling inside the model;
- `anatomy`: `describe(model)`: backbone, blocks, head, BatchNorm layers;
- `freezing`: `freeze`, `unfreeze`, the BatchNorm policy, trainable summaries;
- `remat`: recomputing transformer blocks in the backward pass;
- `packing`: how a causal-LM backbone runs packed rows.

Add a backbone family here (`register_backbone`, or a row in `families`).
Imports: `kft.utils` only.
"""

from kft._lazy import attach

_EXPORTS = {
    "backbone_blocks": "kft.backbones.blocks",
    "BackboneFamily": "kft.backbones.blocks",
    "BlockSplitter": "kft.backbones.blocks",
    "build_backbone": "kft.backbones.blocks",
    "get_backbone": "kft.backbones.blocks",
    "get_packaged_weights": "kft.backbones.blocks",
    "list_backbones": "kft.backbones.blocks",
    "list_packaged_weights": "kft.backbones.blocks",
    "named_backbone_blocks": "kft.backbones.blocks",
    "PackagedWeights": "kft.backbones.blocks",
    "register_backbone": "kft.backbones.blocks",
    "WeightsUnavailableError": "kft.backbones.blocks",
}
__getattr__, __dir__, __all__ = attach(__name__, _EXPORTS)
