"""kft.causal_lm: loading causal LMs offline, dtype, quantization, anatomy."""

import os

import numpy as np
import pytest
from llm_fixtures import CHAT_TEMPLATE
from llm_fixtures import tiny_causal_lm
from llm_fixtures import write_hf_checkpoint

from kft.backbones.anatomy import backbone_blocks_of
from kft.backbones.anatomy import describe
from kft.models.causal_lm import build_causal_lm
from kft.models.causal_lm import read_chat_template

PROMPTS = ["a b hello", "c d"]


@pytest.fixture(scope="module")
def original():
    return tiny_causal_lm(sequence_length=16)


@pytest.fixture(scope="module")
def checkpoint(original, tmp_path_factory):
    return write_hf_checkpoint(original, tmp_path_factory.mktemp("hf") / "tiny")


def logits(lm, prompts=PROMPTS):
    x = lm.preprocessor.generate_preprocess(prompts, sequence_length=16)
    return np.asarray(lm(x), "float32")


def test_builds_from_a_local_hf_directory_offline(original, checkpoint,
                                                   no_network):
    lm = build_causal_lm(checkpoint, sequence_length=24)
    assert type(lm).__name__ == "Llama3CausalLM"
    assert lm.preprocessor.sequence_length == 24
    assert lm.chat_template == CHAT_TEMPLATE
    np.testing.assert_allclose(logits(lm), logits(original), atol=1e-5)
    anatomy = describe(lm)
    assert (anatomy.task, anatomy.family, anatomy.logits) == (
        "causal_lm", "Llama3Backbone", True)
    assert [name for name, _ in backbone_blocks_of(lm)] == [
        "embeddings", "transformer_layer_0", "transformer_layer_1", "top"]


def test_builds_from_a_keras_hub_preset_directory(tmp_path, no_network):
    # Untied: keras-hub 0.32 does not save a Llama backbone's tied embeddings.
    saved = tiny_causal_lm(sequence_length=16, tie_word_embeddings=False)
    saved.preprocessor = None
    saved.save_to_preset(str(tmp_path))
    lm = build_causal_lm(tmp_path)
    assert lm.chat_template is None and lm.preprocessor is None
    x = {"token_ids": np.array([[5, 6, 7]], "int32"),
         "padding_mask": np.ones((1, 3), bool)}
    np.testing.assert_allclose(lm(x), saved(x), atol=1e-6)


# int4 kernels are stored two to an int8; the tolerance is relative to the
# largest logit of a random model (whose weights quantize badly).
@pytest.mark.parametrize("mode, kernel_dtype, tolerance",
                         [("int8", "int8", 0.05), ("int4", "int8", 0.3)])
def test_quantize_gives_integer_kernels(original, checkpoint, mode, kernel_dtype,
                                        tolerance):
    lm = build_causal_lm(checkpoint, quantize=mode)
    kernels = {w.path: str(w.dtype) for w in lm.backbone.weights
               if w.path.endswith("/kernel")}
    assert len(kernels) == 2 * 7  # per layer: q, k, v, o, gate, up, down
    assert set(kernels.values()) == {kernel_dtype}
    # The embedding (here also the output head) is int8 in both modes.
    assert lm.backbone.get_layer("token_embedding").quantization_mode == "int8"
    error = np.abs(logits(lm) - logits(original)).max()
    assert error < tolerance * np.abs(logits(original)).max()
    if mode == "int8":
        assert isinstance(lm.generate("a b", max_length=6), str)


@pytest.mark.parametrize("bad", ["int3", "float8", "INT8", 8])
def test_bad_quantize_names_what_is_allowed(checkpoint, bad):
    with pytest.raises(ValueError, match=r"quantize must be one of \(None, "
                                         r"'int8', 'int4'\)\. Received: "):
        build_causal_lm(checkpoint, quantize=bad)


def test_dtype_reaches_the_weights(checkpoint):
    lm = build_causal_lm(checkpoint, dtype="bfloat16")
    assert {str(w.dtype) for w in lm.backbone.weights} == {"bfloat16"}
    assert logits(lm).shape == (2, 16, lm.backbone.vocabulary_size)


def test_a_preset_that_needs_the_network_is_one_clear_sentence(no_network):
    with pytest.raises(RuntimeError) as error:
        build_causal_lm("llama3_8b_en")
    message = str(error.value)
    assert "'llama3_8b_en'" in message
    assert "pass a local directory" in message.lower()
    assert "\n" not in message


def test_a_missing_directory_says_so(tmp_path):
    with pytest.raises(ValueError, match="No such model directory"):
        build_causal_lm(tmp_path / "missing")
    with pytest.raises(ValueError, match="Could not load a causal LM from"):
        build_causal_lm(tmp_path)  # a directory, but no config.json


def test_read_chat_template_forms(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        '{"chat_template": [{"name": "tool_use", "template": "T"},'
        ' {"name": "default", "template": "D"}]}')
    assert read_chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert read_chat_template(tmp_path) == "J"
    assert read_chat_template("llama3_8b_en") is None


def _smollm2_dir():
    assets = os.environ.get("KFT_ASSETS", os.path.expanduser("~/.cache/kft/assets"))
    return os.path.join(assets, "smollm2_135m_instruct")


@pytest.mark.large
def test_smollm2_packed_sft_batches_match_unpacked_logits():
    """The real SmolLM2-135M-Instruct: chat template, packing, generation."""
    pytest.importorskip("jinja2")
    if not os.path.isfile(os.path.join(_smollm2_dir(), "config.json")):
        pytest.skip(f"SmolLM2 not converted in {_smollm2_dir()}: run "
                    "scripts/prepare_smollm2.py")
    from kft.data.sft import sft_examples
    from kft.sft.model import SFTCausalLM

    lm = build_causal_lm(_smollm2_dir(), sequence_length=96)
    assert lm.chat_template and describe(lm).task == "causal_lm"
    assert len(backbone_blocks_of(lm)) == 32  # embeddings, 30 layers, top
    chats = [{"messages": [{"role": "user", "content": question},
                           {"role": "assistant", "content": answer}]}
             for question, answer in [("What is 2 + 2?", "4."),
                                      ("Name a colour.", "Blue.")]]
    (x, y, weights), stats = sft_examples(chats, lm, format="messages",
                                          packing=True, shuffle=False)
    (alone, _, _), _ = sft_examples(chats, lm, format="messages", shuffle=False)
    assert stats.rows == 1 and stats.examples == 2
    packed = np.asarray(SFTCausalLM(lm)(x))
    single = np.asarray(lm(alone))
    ends = np.cumsum(alone["padding_mask"].sum(axis=1))
    for i, (begin, end) in enumerate(zip([0, *ends[:-1]], ends)):
        np.testing.assert_allclose(packed[0, begin:end], single[i, :end - begin],
                                   atol=1e-3)


def test_remat_rematerialises_every_transformer_block(original, checkpoint):
    from kft.backbones.remat import remat_enabled
    from kft.sft.model import SFTCausalLM

    lm = build_causal_lm(checkpoint, sequence_length=16, remat=True)
    assert remat_enabled(lm) and SFTCausalLM(lm).remat
    assert not remat_enabled(build_causal_lm(checkpoint, sequence_length=16))
    np.testing.assert_allclose(logits(lm), logits(original), atol=1e-5)


def test_fine_tune_trains_the_causal_lm_that_build_causal_lm_returns(checkpoint):
    """keras-hub's `CausalLM.fit` would run the tokenizer on the tokenised
    SFT batches again; `fine_tune` trains it inside `SFTCausalLM`, which
    shares its weights, so `lm` itself learns."""
    import kft

    lm = build_causal_lm(checkpoint, sequence_length=16)
    records = [{"prompt": "a b", "completion": " c d"},
               {"prompt": "b a", "completion": " e"}]
    data = kft.data.sft_dataset(records, lm, batch_size=2, shuffle=False)
    (x, _, _), _ = kft.sft.sft_examples(records, lm, shuffle=False)
    before = np.asarray(lm(x), "float32")
    histories = kft.fine_tune(lm, data, data, verbose=0, stages=[
        {"name": "sft", "epochs": 4, "trainable": "all", "learning_rate": 1e-2}])
    history = histories[0].history
    assert history["loss"][-1] < history["loss"][0]
    assert "val_accuracy" in history and "accuracy" not in history
    assert np.abs(np.asarray(lm(x), "float32") - before).max() > 1e-3
