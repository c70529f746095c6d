"""How much accelerator memory a causal-LM fine-tuning step needs, before it runs.

`plan_memory` adds up what one training step holds, from the model's shape
alone (no weights loaded, no Keras): the state the step reads and writes
(weights, LoRA adapters, optimizer slots, the batch) and the temporary
buffers XLA allocates for it (activations kept for the backward pass, the
logits and their gradient, gradients). The temporary part is the largest
of three moments of the step:

- the start of the backward pass: every activation kept, the logits and
  their gradient, and (full fine-tuning) the embedding's gradients;
- with rematerialisation, a block's backward pass: the blocks' inputs and
  one block's activations, recomputed;
- the optimizer update: every gradient.

The sizes per token follow keras-hub's Llama-style blocks (RMSNorm in
float32, rotary attention with the softmax in float32, a gated SiLU MLP in
float32). Their coefficients were read from XLA's memory analysis of the
compiled JAX train step of keras-hub's `Llama3Backbone` (float32, where the
CPU and a GPU keep the same buffers; `benchmarks/memory_plan.py` compares
the two at ten shapes: within 6%; up to 23% over for a 32-wide model with
8-wide heads). The bfloat16 plan (the GPU's buffers) is not checked: on a
CPU XLA runs bfloat16 matmuls in float32. Other families (GPT-2, Gemma)
are estimated with the same formulas.

Attention: `"xla"` materialises the scores (batch x heads x sequence^2 per
layer: XLA on a CPU, a T4); `"flash"` is cuDNN's fused attention, which
Keras' JAX backend uses on Ampere and newer GPUs (L4, A100, H100), and
keeps only the boolean mask per layer (not measured: no GPU here).
"""

import dataclasses
import json
import os

__all__ = ["ACCELERATORS", "DTYPES", "METHODS", "MemoryPlan", "ModelShape",
           "model_shape", "plan_memory"]

GIB = 2 ** 30
# Accelerator -> (memory in GiB, the attention kernel Keras' JAX backend
# uses on it: cuDNN flash attention needs compute capability 8.0).
ACCELERATORS = {
    "T4 16GB": (16, "xla"),
    "L4 24GB": (24, "flash"),
    "A100 40GB": (40, "flash"),
    "A100 80GB": (80, "flash"),
    "H100 80GB": (80, "flash"),
}
# What a run can use of a device's memory: the CUDA context, the allocator's
# fragmentation and XLA's own reserve take the rest. (JAX preallocates 75%
# unless XLA_PYTHON_CLIENT_MEM_FRACTION says more, e.g. .95.)
USABLE_FRACTION = 0.9
METHODS = ("full", "lora", "qlora")
# Dtype policy -> (bytes of a weight, bytes of a computed activation).
DTYPES = {"float32": (4, 4), "bfloat16": (2, 2), "float16": (2, 2),
          "mixed_bfloat16": (4, 2), "mixed_float16": (4, 2)}
OPTIMIZER_SLOTS = {"adamw": 2, "adam": 2, "lion": 1, "sgd": 0}
# Quantize mode -> (bytes per kernel weight, with its scales; share of one
# block's kernels XLA keeps dequantized at once, measured).
QUANTIZED = {"int8": (1.0, 0.3), "int4": (0.5 + 4 / 128, 0.75)}
LORA_TARGETS = {
    "all-linear": ("query", "key", "value", "output", "gate", "up", "down"),
    "attention": ("query", "key", "value", "output"),
    "mlp": ("gate", "up", "down"),
}
# Bytes of a score (batch x head x query x key) per block: float32 scores
# and softmax, and the probabilities in the compute dtype (XLA: 11.7 in
# float32). Flash attention keeps the boolean mask.
_SCORE_FLOAT32_ARRAYS = 2
_FLASH_MASK_BYTES = 1
# Inputs, targets, sample weights (int32, int32, float32) and the padding
# mask (bool), per token.
_BATCH_BYTES_PER_TOKEN = 13

# SmolLM2-135M (kft's packaged causal LM), without its checkpoint.
KNOWN_SHAPES = {
    "smollm2": dict(vocabulary_size=49152, num_layers=30, hidden_dim=576,
                    intermediate_dim=1536, num_query_heads=9,
                    num_key_value_heads=3, tie_word_embeddings=True),
}


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that set its memory.

    Attributes:
        vocabulary_size, num_layers, hidden_dim, intermediate_dim,
        num_query_heads, num_key_value_heads: keras-hub's names.
        head_dim: per head; default `hidden_dim // num_query_heads`.
        tie_word_embeddings: the output head is the token embedding.
    """

    vocabulary_size: int
    num_layers: int
    hidden_dim: int
    intermediate_dim: int
    num_query_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    tie_word_embeddings: bool = True

    @property
    def head_size(self):
        return self.head_dim or self.hidden_dim // self.num_query_heads

    def projection_shapes(self):
        """`{name: (fan_in, fan_out)}` of one block's seven kernels."""
        d, f = self.hidden_dim, self.intermediate_dim
        q = self.num_query_heads * self.head_size
        kv = self.num_key_value_heads * self.head_size
        return {"query": (d, q), "key": (d, kv), "value": (d, kv),
                "output": (q, d), "gate": (d, f), "up": (d, f), "down": (f, d)}

    @property
    def block_kernel_params(self):
        return sum(i * o for i, o in self.projection_shapes().values())

    @property
    def embedding_params(self):
        tables = 1 if self.tie_word_embeddings else 2
        return tables * self.vocabulary_size * self.hidden_dim

    @property
    def params(self):
        norms = (2 * self.num_layers + 1) * self.hidden_dim
        return (self.embedding_params + norms
                + self.num_layers * self.block_kernel_params)


_HF_KEYS = {"vocab_size": "vocabulary_size", "num_hidden_layers": "num_layers",
            "hidden_size": "hidden_dim", "intermediate_size": "intermediate_dim",
            "num_attention_heads": "num_query_heads",
            "num_key_value_heads": "num_key_value_heads", "head_dim": "head_dim",
            "tie_word_embeddings": "tie_word_embeddings"}


def _unwrap(config):
    config = config.get("base", config)  # a LoRA-adapted keras-hub backbone
    return dict(config.get("config", config))  # keras-hub's config.json


def _shape_from_dict(config):
    config = _unwrap(config)
    values = {_HF_KEYS.get(key, key): value for key, value in config.items()}
    fields = {f.name for f in dataclasses.fields(ModelShape)}
    values = {k: v for k, v in values.items() if k in fields}
    values.setdefault("num_key_value_heads", values.get("num_query_heads"))
    if values.get("head_dim") == (values.get("hidden_dim", 0)
                                  // max(values.get("num_query_heads", 1), 1)):
        values.pop("head_dim")  # the default, written out (Hugging Face)
    missing = sorted(f.name for f in dataclasses.fields(ModelShape)
                     if f.default is dataclasses.MISSING and f.name not in values)
    if missing:
        raise ValueError(f"The model config lacks {missing} (keras-hub or "
                         "Hugging Face names). Received keys: "
                         f"{sorted(config)}")
    return ModelShape(**values)


def model_shape(model_or_config):
    """The `ModelShape` of a model, a config, a checkpoint or a known name.

    Args:
        model_or_config: a `ModelShape`; a keras-hub `CausalLM` or
            `Backbone` (or a kft model with a `backbone`); a dict of
            keras-hub (`hidden_dim`, ...) or Hugging Face (`hidden_size`,
            ...) config keys; a checkpoint directory or its `config.json`;
            or a name of `KNOWN_SHAPES` (`"smollm2"`).

    Returns:
        A `ModelShape`.
    """
    value = model_or_config
    if isinstance(value, ModelShape):
        return value
    if isinstance(value, dict):
        return _shape_from_dict(value)
    backbone = getattr(value, "backbone", value)
    if hasattr(backbone, "get_config"):
        config = _unwrap(backbone.get_config())
        # keras-hub 0.32's Llama 3 config omits it; the attribute has it.
        if hasattr(backbone, "tie_word_embeddings"):
            config["tie_word_embeddings"] = backbone.tie_word_embeddings
        return _shape_from_dict(config)
    if isinstance(value, (str, os.PathLike)):
        return _shape_from_path(os.fspath(value))
    raise ValueError("plan_memory needs a keras-hub causal LM or backbone, a "
                     "config dict, a checkpoint directory or one of "
                     f"{sorted(KNOWN_SHAPES)}. Received: {type(value).__name__}")


def _shape_from_path(path):
    if path in KNOWN_SHAPES:
        return ModelShape(**KNOWN_SHAPES[path])
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"No model config at {path!r}: pass a checkpoint "
                         "directory with config.json, a config dict or one of "
                         f"{sorted(KNOWN_SHAPES)}.")
    with open(path, encoding="utf-8") as f:
        return _shape_from_dict(json.load(f))


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Predicted memory of one training step, in bytes.

    Attributes:
        shape: the `ModelShape`.
        settings: the arguments of `plan_memory` this plan is for.
        weights: the model's weights (quantized ones at their size).
        adapters: LoRA's float32 A and B matrices.
        gradients: the trained variables' gradients.
        optimizer_state: the optimizer's slots.
        activations: what the step keeps for the backward pass, with the
            plan's `remat` (the larger of the two moments when on).
        activations_without_remat, activations_with_remat: both, to compare.
        logits: the logits and their gradient.
        other: the batch, the embedding's second gradient buffer (full
            fine-tuning), dequantized kernels (QLoRA).
        peak: the state plus the largest moment of the step: the number to
            compare with a device's memory.
        devices: `{accelerator: (peak there, fits, setting that would
            make it fit or None)}`, with that device's attention kernel.
    """

    shape: ModelShape
    settings: dict
    weights: int
    adapters: int
    gradients: int
    optimizer_state: int
    activations: int
    activations_without_remat: int
    activations_with_remat: int
    logits: int
    other: int
    peak: int
    devices: dict = dataclasses.field(default_factory=dict)

    def summary(self):
        """The plan as a table: components, the peak, and each device."""
        settings = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        rows = [("weights", self.weights), ("adapters", self.adapters),
                ("gradients", self.gradients),
                ("optimizer state", self.optimizer_state),
                ("activations (remat off)", self.activations_without_remat),
                ("activations (remat on)", self.activations_with_remat),
                ("logits", self.logits), ("other", self.other),
                ("peak", self.peak)]
        lines = [f"Memory plan ({settings})",
                 *(f"  {name:<26}{_gib(value):>10}" for name, value in rows)]
        for device, (peak, fits, suggestion) in self.devices.items():
            verdict = "fits" if fits else (
                f"does not fit; fits with {suggestion}" if suggestion
                else "does not fit, even with remat, QLoRA int4, batch 1")
            kernel = self.settings.get("attention", "auto")
            kernel = ACCELERATORS[device][1] if kernel == "auto" else kernel
            lines.append(f"  {device:<10} {_gib(peak):>10}  ({kernel:<5} "
                         f"attention) {verdict}")
        return "\n".join(lines)


def _gib(value):
    return f"{value / GIB:.2f} GiB"


def _check(method, dtype, quantize, optimizer, attention, lora_targets):
    choices = (("method", method, METHODS), ("dtype", dtype, tuple(DTYPES)),
               ("quantize", quantize, (None, *QUANTIZED)),
               ("optimizer", optimizer, tuple(OPTIMIZER_SLOTS)),
               ("attention", attention, ("auto", "xla", "flash")),
               ("lora_targets", lora_targets, tuple(LORA_TARGETS)))
    for name, value, allowed in choices:
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}. "
                             f"Received: {name}={value!r}")
    if (method == "qlora") != (quantize is not None):
        raise ValueError("method='qlora' goes with quantize='int8' or 'int4' "
                         "(a quantized base under LoRA adapters), and only it. "
                         f"Received: method={method!r}, quantize={quantize!r}")


def plan_memory(model_or_config, *, method="lora", sequence_length=512,
                batch_size=8, dtype="bfloat16", remat=False, lora_rank=8,
                quantize=None, lora_targets="all-linear", optimizer="adamw",
                attention="auto"):
    """Predicts the peak memory of a fine-tuning step, and where it fits.

    Pure arithmetic on the model's shape (nothing is built or loaded); see
    the module docstring for what is counted and how it was checked.

    Args:
        model_or_config: what `model_shape` takes: a keras-hub causal LM, a
            config dict, a checkpoint directory or `"smollm2"`.
        method: `"full"`, `"lora"` or `"qlora"` (LoRA over a quantized
            base; give `quantize`).
        sequence_length: tokens per row.
        batch_size: rows per step.
        dtype: the Keras dtype policy: `"bfloat16"`, `"mixed_bfloat16"`
            (float32 weights), `"float32"`, `"float16"`, `"mixed_float16"`.
        remat: rematerialised transformer blocks (`kft.remat`).
        lora_rank: the adapters' rank (LoRA and QLoRA).
        quantize: `"int8"` or `"int4"` with `method="qlora"`.
        lora_targets: `"all-linear"`, `"attention"` or `"mlp"`.
        optimizer: `"adamw"`, `"adam"`, `"lion"` or `"sgd"` (slots per
            trained weight: 2, 2, 1, 0).
        attention: `"auto"` (each device's own kernel; the plan's own
            numbers with `"xla"`), `"xla"` (scores materialised) or
            `"flash"` (cuDNN fused attention).

    Returns:
        A `MemoryPlan` (`print(plan.summary())`).

    Example:

    ```python
    plan = kft.plan_memory("smollm2", method="lora", sequence_length=4096,
                           batch_size=1, remat=True)
    print(plan.summary())
    plan.devices["T4 16GB"]  # (peak bytes, fits, suggestion)
    ```
    """
    shape = model_shape(model_or_config)
    _check(method, dtype, quantize, optimizer, attention, lora_targets)
    if sequence_length < 1 or batch_size < 1 or lora_rank < 0:
        raise ValueError("sequence_length and batch_size must be >= 1 and "
                         "lora_rank >= 0. Received: sequence_length="
                         f"{sequence_length}, batch_size={batch_size}, "
                         f"lora_rank={lora_rank}")
    settings = dict(method=method, sequence_length=sequence_length,
                    batch_size=batch_size, dtype=dtype, remat=remat,
                    lora_rank=lora_rank, quantize=quantize,
                    lora_targets=lora_targets, optimizer=optimizer,
                    attention=attention)
    kernel = "xla" if attention == "auto" else attention
    plan = _plan(shape, settings, kernel)
    devices = {}
    for device, (gib, device_kernel) in ACCELERATORS.items():
        device_kernel = device_kernel if attention == "auto" else attention
        there = _plan(shape, settings, device_kernel)
        capacity = gib * GIB * USABLE_FRACTION
        fits = there.peak <= capacity
        devices[device] = (there.peak, fits, None if fits else _suggest(
            shape, settings, device_kernel, capacity))
    return dataclasses.replace(plan, devices=devices)


def _state(shape, settings):
    """`(weights, adapters, optimizer_state, gradients)` in bytes."""
    weight_bytes, _ = DTYPES[settings["dtype"]]
    slots = OPTIMIZER_SLOTS[settings["optimizer"]]
    if settings["method"] == "qlora":
        per_weight, _ = QUANTIZED[settings["quantize"]]
        kernels = shape.num_layers * shape.block_kernel_params
        # The token embedding (and an untied head) in int8, a float32
        # scale per row.
        weights = (kernels * per_weight + shape.embedding_params
                   + 4 * shape.vocabulary_size
                   + (2 * shape.num_layers + 1) * shape.hidden_dim * weight_bytes)
    else:
        weights = shape.params * weight_bytes
    if settings["method"] == "full":
        trained = weights
        adapters = 0
    else:
        shapes = shape.projection_shapes()
        per_block = sum(settings["lora_rank"] * (shapes[n][0] + shapes[n][1])
                        for n in LORA_TARGETS[settings["lora_targets"]])
        # float32 masters whatever the policy (cast for the step).
        adapters = trained = 4 * shape.num_layers * per_block
    return int(weights), int(adapters), int(slots * trained), int(trained)


def _block_activations(shape, tokens, batch_size, length, compute, kernel):
    """Bytes one block keeps for its backward pass (keras-hub's Llama)."""
    d, f = shape.hidden_dim, shape.intermediate_dim
    kv = shape.num_key_value_heads * shape.head_size
    # RMSNorms' float32 input and output (two norms), the float32 SiLU's
    # gate and activation; the rest (projections, rotary q / k, attention
    # output, residuals, the MLP's product) in the compute dtype.
    per_token = 4 * (4 * d + 2 * f) + compute * (7 * d + 3 * kv + 3 * f)
    if kernel == "flash":
        scores = _FLASH_MASK_BYTES * batch_size * length * length
    else:
        score_bytes = 4 * _SCORE_FLOAT32_ARRAYS + compute
        scores = (score_bytes * batch_size * shape.num_query_heads
                  * length * length)
    return per_token * tokens + scores


def _plan(shape, settings, kernel):
    """The `MemoryPlan` of `settings` with attention `kernel`, no devices."""
    weights, adapters, optimizer_state, gradients = _state(shape, settings)
    weight_bytes, compute = DTYPES[settings["dtype"]]
    length, batch = settings["sequence_length"], settings["batch_size"]
    tokens = length * batch
    block = _block_activations(shape, tokens, batch, length, compute, kernel)
    without_remat = shape.num_layers * block
    inputs_kept = shape.num_layers * tokens * shape.hidden_dim * compute
    with_remat = inputs_kept + block
    logits = 2 * compute * tokens * shape.vocabulary_size
    table = shape.vocabulary_size * shape.hidden_dim
    extra = update_extra = 0
    if settings["method"] == "full":
        # The head's gradient and the lookup's, before they are summed.
        extra, update_extra = 2 * table * weight_bytes, table * weight_bytes
    elif settings["method"] == "qlora":
        _, share = QUANTIZED[settings["quantize"]]
        # Dequantized for the step: the embedding, and part of a block's
        # kernels at a time.
        extra = compute * (table + share * shape.block_kernel_params)
    kept = with_remat if settings["remat"] else without_remat
    moments = [inputs_kept + logits, with_remat] if settings["remat"] else [
        without_remat + logits]
    batch_bytes = _BATCH_BYTES_PER_TOKEN * tokens
    temporary = max(max(moments) + extra, gradients + update_extra)
    peak = weights + adapters + optimizer_state + batch_bytes + temporary
    return MemoryPlan(shape, dict(settings), weights, adapters, gradients,
                      optimizer_state, int(kept), int(without_remat),
                      int(with_remat), int(logits), int(batch_bytes + extra),
                      int(peak))


def _suggest(shape, settings, kernel, capacity):
    """The first of a ladder of cheaper settings that fits, in words."""
    current = dict(settings)
    changes = []
    steps = [("remat", True)]
    if settings["method"] == "full":
        steps.append(("method", "lora"))
    steps += [("quantize", "int8"), ("quantize", "int4")]
    for key, value in steps:
        if key == "quantize" and current["quantize"] == "int4":
            continue
        if current.get(key) == value:
            continue
        current[key] = value
        if key == "quantize":
            current["method"] = "qlora"
            changes = [c for c in changes if not c.startswith(("method=",
                                                               "quantize="))]
            changes.append("method='qlora'")
        changes.append(f"{key}={value!r}")
        if _plan(shape, current, kernel).peak <= capacity:
            return ", ".join(changes)
    for key in ("batch_size", "sequence_length"):
        while current[key] > 1:
            current[key] = max(1, current[key] // 2)
            if _plan(shape, current, kernel).peak <= capacity:
                return ", ".join([*changes, f"{key}={current[key]}"])
    return None
