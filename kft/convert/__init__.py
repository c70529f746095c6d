"""Checkpoint converters: formats keras-hub cannot read, read without
executing code, written as Hugging Face / timm directories keras-hub loads.

- `kft.convert.torch_checkpoint`: PyTorch `.pth` / `.bin` files (legacy and
  zip serialization) through a restricted unpickler, no PyTorch needed.
- `kft.convert.timm`: EfficientNet-PyTorch (lukemelas) EfficientNet-Lite0
  weights to a timm `efficientnet_lite0` directory (safetensors + config).
- `kft.convert.gguf`: llama.cpp GGUF files to a Hugging Face Llama
  checkpoint directory.
"""
