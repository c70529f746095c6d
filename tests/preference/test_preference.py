"""kft.preference.PreferenceCausalLM: DPO and its family with fit, the
reference without a second copy of the weights, reward metrics."""

import keras
import numpy as np
import pytest
from llm_fixtures import tiny_causal_lm

import kft
from kft.data.preference import preference_dataset
from kft.data.preference import preference_examples
from kft.data.preference import reference_logps
from kft.lora.model import apply_lora
from kft.preference.model import PreferenceCausalLM

PAIRS = [{"prompt": "a b", "chosen": " c d", "rejected": " e"},
         {"prompt": "b a", "chosen": " e", "rejected": " c d"},
         {"prompt": "c", "chosen": " a", "rejected": " b b"},
         {"prompt": "d e", "chosen": " b", "rejected": " a"}]
METRICS = {"loss", "rewards_chosen", "rewards_rejected", "reward_accuracy",
           "reward_margin", "logps_chosen", "logps_rejected"}


def lora_lm(seed=0):
    lm = tiny_causal_lm(sequence_length=16, seed=seed)
    apply_lora(lm, targets="all-linear", rank=4, alpha=8)
    return lm


def snapshot(model):
    return {v.path: np.array(v) for v in model.weights}


def evaluate(model, data):
    return {k: float(v) for k, v in model.evaluate(
        data, verbose=0, return_dict=True).items()}


def test_dpo_with_lora_learns_the_preference_and_moves_only_adapters():
    lm = lora_lm()
    model = PreferenceCausalLM(lm, loss="dpo", beta=0.5)
    # One set of weights: the model's variables are exactly the LM's.
    assert {id(v) for v in model.weights} == {id(v) for v in lm.weights}
    assert len(model.weights) == len(lm.weights)
    data = preference_dataset(PAIRS, lm, batch_size=4)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    before, weights = evaluate(model, data), snapshot(model)
    # Zero-initialised B: policy == reference, every reward is 0, a tie.
    assert before["reward_accuracy"] == 0.5 and before["reward_margin"] == 0.0
    history = model.fit(data.repeat(), steps_per_epoch=10, epochs=2, verbose=0,
                        validation_data=data)
    assert set(history.history) == METRICS | {f"val_{m}" for m in METRICS}
    after = evaluate(model, data)
    assert after["reward_accuracy"] == 1.0 and after["reward_margin"] > 0.2
    assert after["loss"] < before["loss"] - 0.1
    changed = {path for path, value in snapshot(model).items()
               if not np.array_equal(value, weights[path])}
    assert changed and all("lora_" in path for path in changed)
    assert any(path.endswith("lora_b") for path in changed)
    # The adapters are switched back on after every step.
    assert all(layer.adapter_enabled for layer in kft.lora.lora_layers(lm))


def test_reference_is_the_base_with_adapters_off():
    base = tiny_causal_lm(sequence_length=16)
    arrays, _ = preference_examples(PAIRS, base, shuffle=False)
    base_logps = reference_logps(base, *arrays)
    apply_lora(base, targets="all-linear", rank=4, alpha=8)
    model = PreferenceCausalLM(base, loss="ipo")
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit(preference_dataset(PAIRS, base, batch_size=4).repeat(),
              steps_per_epoch=5, epochs=1, verbose=0)
    x, y, weights = arrays
    reference = np.asarray(model._reference_logps(x, y, weights))
    np.testing.assert_allclose(reference, base_logps, atol=1e-5)
    policy = np.asarray(reference_logps(base, *arrays))  # adapters on
    assert np.abs(policy - base_logps).max() > 1e-2


def test_precomputed_and_copied_references_for_full_fine_tuning():
    for reference in ("precomputed", "copy"):
        lm = tiny_causal_lm(sequence_length=16)
        data = preference_dataset(PAIRS, lm, batch_size=4, reference=(
            lm if reference == "precomputed" else None))
        model = PreferenceCausalLM(lm, loss="dpo", beta=0.5, reference=reference)
        assert len(model.weights) == len(lm.weights)  # the copy is not trained
        model.compile(optimizer=keras.optimizers.Adam(3e-3))
        before = evaluate(model, data)
        assert abs(before["rewards_chosen"]) < 1e-5 and before["reward_accuracy"] == 0.5
        model.fit(data.repeat(), steps_per_epoch=8, epochs=1, verbose=0)
        after = evaluate(model, data)
        assert after["reward_accuracy"] == 1.0 and after["reward_margin"] > 0
    twin = model._copy.model  # still the weights before training
    assert not np.allclose(np.asarray(twin.weights[0]), np.asarray(lm.weights[0]))


def test_reference_free_losses_train_without_a_reference():
    for loss in ("simpo", "orpo"):
        lm = tiny_causal_lm(sequence_length=16)
        model = PreferenceCausalLM(lm, loss=loss)
        assert model.reference is None
        data = preference_dataset(PAIRS, lm, batch_size=4)
        model.compile(optimizer=keras.optimizers.Adam(3e-3))
        before = evaluate(model, data)
        model.fit(data.repeat(), steps_per_epoch=8, epochs=1, verbose=0)
        after = evaluate(model, data)
        # Rewards are beta times the mean token log-probability: SimPO's
        # beta is 2, ORPO's 0.1 (whose loss is mostly the chosen NLL).
        assert after["reward_margin"] > before["reward_margin"] + (
            0.1 if loss == "simpo" else 0.002), loss
        assert after["reward_accuracy"] >= before["reward_accuracy"], loss
        assert after["loss"] < before["loss"], loss


def test_kto_on_unpaired_records():
    records = [{"prompt": p["prompt"], "completion": p[key], "label": good}
               for p in PAIRS for key, good in (("chosen", True),
                                                ("rejected", False))]
    lm = lora_lm()
    model = PreferenceCausalLM(lm, loss="kto", beta=0.5)
    data = preference_dataset(records, lm, format="unpaired", batch_size=8)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = model.fit(data.repeat(), steps_per_epoch=10, epochs=1, verbose=0)
    assert set(history.history) == METRICS | {"kl"}
    after = evaluate(model, data)
    assert after["rewards_chosen"] > 0 > after["rewards_rejected"]
    assert after["reward_accuracy"] > 0.7
    with pytest.raises(ValueError, match="unpaired, labelled data"):
        model.evaluate(preference_dataset(PAIRS, lm), verbose=0)


def test_fine_tune_trains_it_as_a_stage():
    lm = lora_lm()
    model = PreferenceCausalLM(lm, loss="dpo", beta=0.5)
    data = preference_dataset(PAIRS, lm, batch_size=4)
    histories = kft.fine_tune(model, data, data, stages=[{
        "name": "dpo", "epochs": 2, "trainable": "keep", "learning_rate": 1e-2}],
        verbose=0)
    assert histories[0].history["val_reward_accuracy"][-1] == 1.0


@pytest.mark.parametrize("kwargs, message", [
    ({"loss": "dpop"}, r"loss must be one of \('dpo'"),
    ({"reference": "frozen"}, "reference must be one of"),
    ({"loss": "dpo", "gamma": 0.5}, r"takes the options \['label_smoothing'\]"),
])
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreferenceCausalLM(lora_lm(), **kwargs)


def test_reference_needs_adapters_or_data_and_compile_keeps_the_loss():
    lm = tiny_causal_lm(sequence_length=16)
    with pytest.raises(ValueError, match="has none. Apply LoRA first"):
        PreferenceCausalLM(lm)
    with pytest.raises(ValueError, match="with LoRA use reference='adapters_off'"):
        PreferenceCausalLM(lora_lm(), reference="copy")
    model = PreferenceCausalLM(lm, reference="precomputed")
    with pytest.raises(ValueError, match="compile takes loss='auto'"):
        model.compile(loss="mse")
    model.compile()
    with pytest.raises(ValueError, match=r"reference=lm\)"):
        model.evaluate(preference_dataset(PAIRS, lm), verbose=0)
