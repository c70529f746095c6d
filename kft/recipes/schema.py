"""The recipe schema: what a YAML recipe may say, validated by pydantic.

A recipe is data. It names registered components only (backbone
families, optimizers, data sources); it can never import code.
"""

from typing import Literal

import pydantic
from pydantic import Field

from kft.backbones import families as backbones
from kft.distribute.mesh import KERAS_DISTRIBUTIONS
from kft.distribute.mesh import check_mesh
from kft.lora.config import LoRAConfig as LibraryLoRAConfig
from kft.models.head_config import HeadConfig
from kft.recipes.data_config import AUDIO_SOURCES
from kft.recipes.data_config import SFT_SOURCES
from kft.recipes.data_config import TEXT_SOURCES
from kft.recipes.data_config import AudioAugmentationConfig
from kft.recipes.data_config import AugmentationConfig
from kft.recipes.data_config import DataConfig
from kft.recipes.preference_config import PREFERENCE_SOURCES
from kft.recipes.preference_config import PreferenceConfig
from kft.recipes.preference_config import check_preference
from kft.recipes.rl_config import RL_SOURCES
from kft.recipes.rl_config import RLConfig
from kft.recipes.rl_config import check_rl
from kft.recipes.search import Distribution
from kft.recipes.vision_config import VisionConfig
from kft.recipes.vision_config import check_vision
from kft.training.stages import Stage
from kft.training.stages import policy_stages
from kft.utils.validation import Strict

__all__ = ["DataConfig", "LoRAConfig", "ModelConfig", "PromptTuningConfig",
           "RecipeConfig", "SearchConfig"]

_PYTHON_ONLY_STAGE_KEYS = ("callbacks", "loss", "metrics")


MODEL_KINDS = ("backbone", "preset", "text", "causal_lm", "audio")
_AUDIO_MODEL_KEYS = ("sample_rate", "max_seconds", "pooling")


class ModelConfig(Strict):
    """`model:` the backbone, its weights and the head.

    An image model names a registered CNN `backbone`, or a keras-hub image
    `preset` (a preset name, `hf://...`, a local directory, or a short name
    such as `efficientnet_lite0_imagenet`; `image_size` sets the size its
    image converter resizes to); a text model names a keras-hub `text`
    checkpoint instead (`minilm`, a keras-hub preset name, `hf://...`, or a
    local directory), read by `kft.build_text_classifier`. An audio model
    names a Whisper or Moonshine checkpoint in `audio` (`whisper_tiny`, a keras-hub
    preset name, `hf://...`, or a local directory), read by
    `kft.build_audio_classifier` with `sample_rate`, `max_seconds` and
    `pooling`; `weights` is `preset` (the default) or null. A `causal_lm`
    may be `quantize`d (int8 / int4) and its transformer blocks
    rematerialised in training (`remat: true`, for long sequences; see
    `kft plan`).
    """

    backbone: str | None = None
    preset: str | None = None
    image_size: tuple[int, int] | None = None
    text: str | None = None
    causal_lm: str | None = None
    audio: str | None = None
    sample_rate: int = Field(default=16000, ge=1000)
    max_seconds: float = Field(default=30.0, gt=0, le=30)
    pooling: Literal["mean", "attention"] = "mean"
    quantize: Literal["int8", "int4"] | None = None
    remat: bool = False
    sequence_length: int = Field(default=128, ge=8)
    weights: str | None = None
    input_shape: tuple[int, int, int] | None = None
    head: dict = {}
    bn: Literal["frozen", "train"] = "frozen"
    backbone_kwargs: dict[str, int | float | str | bool] = {}

    @pydantic.model_validator(mode="after")
    def _one_kind(self):
        kinds = [k for k in MODEL_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of model.backbone (a "
                             "keras.applications family), model.preset (a "
                             "keras-hub image preset, hf:// or a directory), "
                             "model.text (a text classifier), "
                             "model.causal_lm (a causal language model) and "
                             "model.audio (a speech encoder)")
        if self.quantize is not None and self.causal_lm is None:
            raise ValueError("model.quantize is for model.causal_lm")
        if self.remat and self.causal_lm is None:
            raise ValueError("model.remat is for model.causal_lm")
        if self.preset is not None:
            if self.backbone_kwargs:
                raise ValueError("model.backbone_kwargs are for model.backbone "
                                 "families, not model.preset")
            if self.weights not in (None, "preset"):
                raise ValueError("model.weights of a preset is 'preset' (its "
                                 "own, the default) or null (random)")
            if "weights" not in self.model_fields_set:
                self.weights = "preset"
        elif self.image_size is not None:
            raise ValueError("model.image_size is for model.preset (the size "
                             "its image converter resizes to)")
        if self.text is not None or self.causal_lm is not None:
            fields = type(self).model_fields
            image_only = sorted(k for k in ("weights", "input_shape", "head",
                                            "backbone_kwargs")
                                if getattr(self, k) != fields[k].default)
            if image_only:
                raise ValueError(f"model keys {image_only} are for image "
                                 "models (model.backbone), not model.text or "
                                 "model.causal_lm")
        return self

    @pydantic.model_validator(mode="after")
    def _audio_keys(self):
        fields = type(self).model_fields
        changed = {k for k in fields if getattr(self, k) != fields[k].default}
        if self.audio is None:
            audio_only = sorted(changed & set(_AUDIO_MODEL_KEYS))
            if audio_only:
                raise ValueError(f"model keys {audio_only} are for audio "
                                 "models (model.audio)")
            return self
        image_only = sorted(changed & {"input_shape", "backbone_kwargs",
                                       "sequence_length"})
        if image_only:
            raise ValueError(f"model keys {image_only} are not for audio "
                             "models (model.audio)")
        if self.weights not in (None, "preset"):
            raise ValueError("model.weights of an audio model is 'preset' (its "
                             "own, the default) or null (random)")
        if "weights" not in self.model_fields_set:
            self.weights = "preset"
        return self

    @pydantic.field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value):
        if value is not None and value not in backbones.list_backbones():
            raise ValueError(
                f"unknown backbone; allowed: {', '.join(backbones.list_backbones())}"
            )
        return value

    @pydantic.field_validator("head")
    @classmethod
    def _valid_head(cls, value):
        HeadConfig.from_value(value)
        return value


class LoRAConfig(LibraryLoRAConfig):
    """`lora:` `kft.lora.apply_lora` on a text model, a causal LM or an
    image classifier: the library's `kft.lora.LoRAConfig`, with a recipe's
    default of what else trains. Stages then train the adapters and what
    `trainable` names (a text classifier's `logits`, an image classifier's
    `head_` layers; nothing else for a causal LM). `targets` is a list of
    layer names / regexes or a preset: `attention`, `mlp`, `all-linear`,
    `pointwise` (1x1 convolutions). Image models default to `[query,
    value, pointwise]`: the attention of a ViT, the 1x1 convolutions of a
    CNN. `use_dora: true` is DoRA, `init: pissa` / `olora` start the
    adapters from the kernel, `lr_ratio: 16` is LoRA+ (every stage trains
    the B matrices at 16x its learning rate: the stages' `lora_lr_ratio`,
    unless a stage sets its own)."""

    trainable: list[str] = ["logits"]


class GenerateConfig(Strict):
    """`generate:` prompts a causal-LM run completes (greedy) before and
    after training, written to `samples.json`."""

    prompts: list[str] = Field(min_length=1)
    max_length: int = Field(default=64, ge=2)


class PromptTuningConfig(Strict):
    """`prompt_tuning:` virtual tokens on a frozen model: a BERT-family
    text model (`kft.build_text_classifier(prompt_tuning=...)`) or a
    rotary-position causal LM (`kft.prompt_causal.prompt_tune_causal_lm`;
    unpacked data only). `init_text` starts the tokens from a text's
    embeddings."""

    num_virtual_tokens: int = Field(default=20, ge=1)
    init_text: str | None = None


class DistributionConfig(Strict):
    """`distribution:` a `tf.distribute` strategy on TensorFlow, or a
    `keras.distribution` on JAX (`kft.distribute`).

    `distribution: mirrored` is shorthand for `{strategy: mirrored}`.
    `data_parallel` and `model_parallel` take a `mesh` (`{batch: 2, model:
    2}`), whose sizes must multiply to the device count (checked when the
    run starts).
    """

    strategy: Literal["none", "mirrored", "multi_worker", "tpu",
                      "data_parallel", "model_parallel"] = "none"
    devices: list[str] | None = None
    mesh: dict[str, pydantic.StrictInt] | None = None

    @pydantic.model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value):
        return {"strategy": value} if isinstance(value, str) else value

    @pydantic.model_validator(mode="after")
    def _devices_for_mirrored(self):
        if self.devices is not None and self.strategy != "mirrored":
            raise ValueError("devices applies to strategy 'mirrored' only")
        if self.strategy in KERAS_DISTRIBUTIONS:
            check_mesh(self.strategy, self.mesh)
        elif self.mesh is not None:
            raise ValueError(f"mesh applies to strategies {list(KERAS_DISTRIBUTIONS)} "
                             f"only, not {self.strategy!r}")
        return self


class CallbacksConfig(Strict):
    """`callbacks:` what the run writes besides history and metrics."""

    checkpoints: bool = True
    tensorboard: bool = False


class PolicyConfig(Strict):
    """`policy:` a named training policy instead of explicit `stages:`.

    `gradual`: the head alone for `freeze_epochs`, then `epochs` more in
    which one more backbone block unfreezes every `every` epochs.
    """

    name: Literal["gradual"]
    epochs: int = Field(ge=1)
    freeze_epochs: int = Field(default=1, ge=0)
    every: int = Field(default=1, ge=1)
    learning_rate: float | tuple[float, float] = 1e-3


class SearchConfig(Strict):
    """`search:` the hyperparameters `kft tune` searches (`kft run`
    ignores it).

    `space` maps dotted recipe keys (`stages.1.learning_rate`,
    `lora.rank`, `data.batch_size`) to a `Distribution`. `metric` is the
    per-epoch value each trial reports (default: the task's validation
    metric, `val_accuracy` for classifiers, `val_loss` otherwise) and
    `direction` whether it is maximized (default: minimize a loss or
    error, maximize anything else). `pruner` stops a trial whose metric
    falls behind the others' at the same epoch (`median`, `hyperband`,
    `none`), after `min_epochs` epochs and, for `median`, after
    `startup_trials` trials have finished. `seed` seeds the sampler
    (default: the recipe's seed).
    """

    space: dict[str, Distribution] = Field(min_length=1)
    metric: str | None = None
    direction: Literal["maximize", "minimize"] | None = None
    trials: int = Field(default=20, ge=1)
    timeout_minutes: float | None = Field(default=None, gt=0)
    pruner: Literal["median", "hyperband", "none"] = "median"
    min_epochs: int = Field(default=1, ge=1)
    startup_trials: int = Field(default=3, ge=0)
    seed: int | None = None


class RecipeConfig(Strict):
    """A whole recipe: model, data, stages and run settings."""

    name: str
    description: str = ""
    # The kind of run (kft.recipes.tasks): a registered task's name; by
    # default the one the model section calls for.
    task: str | None = None
    seed: int = 0
    deterministic: bool = False
    output_dir: str | None = None
    precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = "float32"
    distribution: DistributionConfig = DistributionConfig()
    callbacks: CallbacksConfig = CallbacksConfig()
    augmentation: AugmentationConfig | AudioAugmentationConfig | None = None
    model: ModelConfig
    data: DataConfig
    lora: LoRAConfig | None = None
    prompt_tuning: PromptTuningConfig | None = None
    generate: GenerateConfig | None = None
    preference: PreferenceConfig | None = None
    vision: VisionConfig | None = None
    rl: RLConfig | None = None
    policy: PolicyConfig | None = None
    stages: list[Stage] = Field(default=[], validate_default=True)
    # What `kft tune` searches; runs ignore it.
    search: SearchConfig | None = None

    @pydantic.model_validator(mode="after")
    def _vision_needs(self):
        check_vision(self)
        return self

    @pydantic.model_validator(mode="after")
    def _audio_needs(self):
        audio = self.model.audio is not None
        if audio != (self.data.source in AUDIO_SOURCES):
            raise ValueError(
                "an audio model (model.audio) trains on an audio data source "
                f"{list(AUDIO_SOURCES)}, and those only feed audio models; "
                f"data.source is {self.data.source!r}")
        if not audio:
            return self
        if isinstance(self.augmentation, AugmentationConfig) and (
                self.augmentation.model_fields_set):
            raise ValueError(
                "augmentation: of an audio model (model.audio) takes waveform "
                "augmentation (noise_snr_db, time_shift, gain_db, speed), not "
                f"{sorted(self.augmentation.model_fields_set)}")
        if isinstance(self.augmentation, AugmentationConfig):
            self.augmentation = AudioAugmentationConfig()
        if self.prompt_tuning is not None:
            raise ValueError("prompt_tuning: adapts text models, not "
                             "model.audio; use lora:")
        if self.lora is not None:
            # The encoder's attention and kft's head (layers named head_*).
            defaults = {"targets": ["query", "value"], "trainable": ["head_"]}
            self.lora = self.lora.model_copy(update={
                k: v for k, v in defaults.items()
                if k not in self.lora.model_fields_set})
        return self

    @pydantic.model_validator(mode="after")
    def _causal_lm_needs(self):
        causal = self.model.causal_lm is not None
        if causal != (self.data.source in SFT_SOURCES + PREFERENCE_SOURCES
                      + RL_SOURCES):
            raise ValueError(
                "a causal LM (model.causal_lm) trains on an SFT data source "
                f"{list(SFT_SOURCES)} or a preference data source "
                f"{list(PREFERENCE_SOURCES)}, and those only feed causal LMs; "
                f"data.source is {self.data.source!r}")
        check_preference(self)
        check_rl(self)
        if self.generate is not None and not causal:
            raise ValueError("generate: is for causal LMs (model.causal_lm)")
        if causal and self.prompt_tuning is not None and self.data.packing:
            raise ValueError("prompt_tuning: on a causal LM takes unpacked "
                             "rows (the virtual tokens would sit at another "
                             "distance before each packed example); set "
                             "data.packing: false")
        strategy = self.distribution.strategy
        if causal and (self.augmentation is not None or strategy not in (
                "none", *KERAS_DISTRIBUTIONS)):
            raise ValueError("augmentation: and tf.distribute strategies do "
                             "not apply to causal-LM recipes yet (on JAX, "
                             "distribution: data_parallel or model_parallel "
                             "do)")
        if strategy == "model_parallel" and not causal:
            raise ValueError("distribution model_parallel splits an LLM with "
                             "the layout map keras-hub gives its backbone "
                             "(model.causal_lm); for other models use "
                             "data_parallel")
        if causal and self.lora is None and self.prompt_tuning is None:
            # Full fine-tuning: a causal LM has no separate head to train.
            self.stages = [
                s if "trainable" in s.model_fields_set
                else s.model_copy(update={"trainable": "all"})
                for s in self.stages]
        return self

    @pydantic.model_validator(mode="after")
    def _text_or_image(self):
        text = self.model.text is not None
        if self.model.causal_lm is not None:
            text = None  # checked by _causal_lm_needs
        if text and self.data.source not in TEXT_SOURCES:
            raise ValueError(f"a text model (model.text) needs a text data "
                             f"source {list(TEXT_SOURCES)}; data.source is "
                             f"{self.data.source!r}")
        if text is False and self.data.source in TEXT_SOURCES:
            raise ValueError(f"data.source {self.data.source!r} gives texts: "
                             "use model.text, not model.backbone")
        if text and self.augmentation is not None:
            raise ValueError("augmentation: is image augmentation; a text "
                             "model takes none")
        if (text is False and self.model.audio is None
                and isinstance(self.augmentation, AudioAugmentationConfig)):
            raise ValueError(
                "augmentation: noise_snr_db, time_shift, gain_db and speed "
                "augment waveforms (model.audio); an image model takes image "
                "augmentation (rotation_range, horizontal_flip, ...)")
        if text is False and self.prompt_tuning:
            raise ValueError("prompt_tuning: adapts text models (model.text)")
        if text is False and self.lora is not None:
            defaults = {"targets": ["query", "value", "pointwise"],
                        "trainable": ["head_"]}
            self.lora = self.lora.model_copy(update={
                k: v for k, v in defaults.items()
                if k not in self.lora.model_fields_set})
        if self.lora and self.prompt_tuning:
            raise ValueError("give lora: or prompt_tuning:, not both")
        if self.lora or self.prompt_tuning:
            # The adapters decide what trains: stages keep those flags
            # unless they say otherwise.
            self.stages = [
                s if "trainable" in s.model_fields_set
                else s.model_copy(update={"trainable": "keep"})
                for s in self.stages]
        return self

    @pydantic.model_validator(mode="after")
    def _policy_to_stages(self):
        # A policy is shorthand: it becomes stages here, so the runner and
        # config.yaml only ever see stages.
        if self.policy is not None:
            if self.stages:
                raise ValueError("give either stages: or policy:, not both")
            policy = self.policy
            self.stages = [Stage.model_validate(s) for s in policy_stages(
                policy.name, policy.epochs, policy.freeze_epochs,
                policy.every, policy.learning_rate)]
        if not self.stages:
            raise ValueError("give at least one stage (or a policy:)")
        return self

    @pydantic.model_validator(mode="after")
    def _lora_lr_ratio_to_stages(self):
        # LoRA+ is an optimizer setting: every stage carries it (one that
        # sets its own lora_lr_ratio keeps it), so fine_tune needs no recipe.
        ratio = self.lora.lr_ratio if self.lora is not None else None
        if ratio is None:
            return self
        for stage in self.stages:
            if stage.lora_lr_ratio is None and (
                    stage.layer_decay is not None
                    or not isinstance(stage.learning_rate, float)):
                raise ValueError(
                    f"lora.lr_ratio (LoRA+) needs one learning_rate per stage "
                    f"(A's rate); stage {stage.name!r} has learning_rate="
                    f"{stage.learning_rate!r}, layer_decay={stage.layer_decay!r}")
        self.stages = [
            s if s.lora_lr_ratio is not None
            else s.model_copy(update={"lora_lr_ratio": ratio})
            for s in self.stages]
        return self

    @pydantic.field_validator("stages")
    @classmethod
    def _unique_stage_names(cls, stages):
        # Stages without a name are numbered; history.csv and the report
        # tell stages apart by name.
        stages = [
            s.model_copy(update={"name": f"stage_{i + 1}"})
            if s.name == "stage" else s
            for i, s in enumerate(stages)
        ]
        names = [s.name for s in stages]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"stage names must be unique; repeated: {duplicates}")
        return stages

    @pydantic.field_validator("stages", mode="before")
    @classmethod
    def _recipe_stage_keys(cls, value):
        for stage in value if isinstance(value, list) else []:
            if isinstance(stage, dict):
                bad = [k for k in _PYTHON_ONLY_STAGE_KEYS if k in stage]
                if bad:
                    raise ValueError(
                        f"stage keys {bad} are for the Python API "
                        "(kft.fine_tune), not recipes"
                    )
        return value

