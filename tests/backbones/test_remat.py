"""kft.remat: rematerialised transformer blocks train exactly as plain ones."""

import keras
import numpy as np
import pytest
from llm_fixtures import tiny_causal_lm

from kft.backbones.remat import remat_enabled
from kft.backbones.remat import set_remat
from kft.data.sft import sft_examples
from kft.lora.model import apply_lora
from kft.sft.model import SFTCausalLM

RECORDS = ["a b c d e", "b a", "c d a b", "e"]


def _one_step(remat, lora_dropout=None, packing=False):
    """The loss and the gradient (SGD at rate 1: the weights' change) of
    one training step of a tiny Llama, in float32."""
    lm = tiny_causal_lm(sequence_length=16)
    if lora_dropout is not None:
        apply_lora(lm, targets="all-linear", rank=2, dropout=lora_dropout)
        for variable in lm.trainable_variables:  # B = 0 gives A no gradient
            if variable.path.endswith("lora_b"):
                variable.assign(np.full(variable.shape, 0.05, "float32"))
    (x, y, sample_weight), _ = sft_examples(RECORDS, lm, format="text",
                                            packing=packing, shuffle=False)
    model = SFTCausalLM(lm, remat=remat)
    assert model.remat is remat and remat_enabled(lm) is remat
    model.compile(optimizer=keras.optimizers.SGD(1.0))
    before = [np.array(v) for v in model.trainable_variables]
    history = model.fit(x, y, sample_weight=sample_weight,
                        batch_size=len(y), epochs=1, shuffle=False, verbose=0)
    after = [np.array(v) for v in model.trainable_variables]
    return history.history["loss"][0], [b - a for b, a in zip(before, after)]


@pytest.mark.parametrize("lora_dropout,packing", [
    (None, False),  # full fine-tuning
    (None, True),  # packed rows: the block-diagonal mask is held fixed
    (0.3, False),  # LoRA dropout: the recomputation draws the same masks
])
def test_remat_gives_the_same_loss_and_gradients(lora_dropout, packing):
    loss, gradients = _one_step(False, lora_dropout, packing)
    remat_loss, remat_gradients = _one_step(True, lora_dropout, packing)
    assert remat_loss == pytest.approx(loss, abs=1e-5)
    assert max(np.abs(g).max() for g in gradients) > 1e-3
    for gradient, remat_gradient in zip(gradients, remat_gradients,
                                        strict=True):
        np.testing.assert_allclose(remat_gradient, gradient, atol=1e-5)


def test_set_remat_is_undone_and_leaves_inference_alone():
    lm = tiny_causal_lm(sequence_length=16)
    (x, _, _), _ = sft_examples(RECORDS, lm, format="text", shuffle=False)
    plain = np.asarray(lm(x))
    blocks = lm.backbone.transformer_layers
    assert set_remat(lm) == len(blocks) == 2 and remat_enabled(lm)
    assert set_remat(lm) == 2  # twice: still one wrapper per block
    np.testing.assert_allclose(np.asarray(lm(x)), plain, atol=1e-6)
    set_remat(lm, False)
    assert not remat_enabled(lm)
    assert all(block.call.__func__ is type(block).call for block in blocks)


def test_sft_model_saves_remat_in_its_config(tmp_path):
    lm = tiny_causal_lm(sequence_length=16, tie_word_embeddings=False)
    (x, _, _), _ = sft_examples(RECORDS, lm, format="text", shuffle=False)
    lm.preprocessor = None  # keras-hub cannot reload this tokenizer
    model = SFTCausalLM(lm, remat=True)
    assert model.get_config()["remat"] is True
    model.save(tmp_path / "sft.keras")
    loaded = keras.saving.load_model(tmp_path / "sft.keras")
    assert loaded.remat is True and remat_enabled(loaded.lm)
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)
    assert SFTCausalLM(loaded.lm).remat is True  # None keeps the lm's
    assert SFTCausalLM(loaded.lm, remat=False).remat is False


def test_remat_needs_transformer_layers():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="transformer_layers.*Sequential"):
        set_remat(model)
    assert remat_enabled(model) is False
