import keras
import numpy as np
import pytest
from conftest import make_images
from conftest import tiny_classifier

import kft
from kft import optimizers
from kft.training.callbacks import GradualUnfreezing


def _vgg():
    return kft.build_classifier("vgg16", 2, input_shape=(32, 32, 3))


def _xy(n=16):
    return make_images(n, classes=2)


class Recorder(keras.callbacks.Callback):
    """Snapshots chosen variables at every epoch end (and begin)."""

    def __init__(self, paths):
        super().__init__()
        self.paths = paths
        self.ends, self.begins, self.end_states = [], [], []

    def _snap(self):
        by_path = {v.path: v for v in self.model.weights}
        return {p: np.array(by_path[p]) for p in self.paths}

    def on_epoch_begin(self, epoch, logs=None):
        self.begins.append(
            {"weights": self._snap(), "optimizer": {
                v.path: np.array(v) for v in self.model.optimizer.variables}})

    def on_epoch_end(self, epoch, logs=None):
        self.ends.append(self._snap())
        self.end_states.append(
            {v.path: np.array(v) for v in self.model.optimizer.variables})


def test_unfreezing_takes_effect_inside_one_fit_and_keeps_adam_state():
    model = _vgg()
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss="sparse_categorical_crossentropy")
    top, bottom = "block5_conv3/kernel", "block1_conv1/kernel"
    head = "head_output/kernel"
    start = {v.path: np.array(v) for v in model.weights}
    unfreezing = GradualUnfreezing({0: 0, 2: 1}, verbose=0)
    recorder = Recorder([top, bottom, head])
    x, y = _xy()
    model.fit(x, y, batch_size=8, epochs=4, verbose=0,
              callbacks=[unfreezing, recorder])
    ends = recorder.ends
    np.testing.assert_array_equal(ends[0][top], start[top])
    np.testing.assert_array_equal(ends[1][top], start[top])
    assert not np.array_equal(ends[2][top], start[top])
    assert not np.array_equal(ends[3][top], ends[2][top])
    for end in ends:
        np.testing.assert_array_equal(end[bottom], start[bottom])
    # The head's Adam moments and the step count survive the unfreeze.
    before, after = recorder.end_states[1], recorder.begins[2]["optimizer"]
    momentum = [p for p in after if p.endswith("head_output_kernel_momentum")]
    assert len(momentum) == 1
    assert np.abs(after[momentum[0]]).sum() > 0
    np.testing.assert_array_equal(before[momentum[0]], after[momentum[0]])
    iterations = [p for p in after if p.endswith("iteration")]
    assert after[iterations[0]] == before[iterations[0]] == 4
    assert unfreezing.events[0]["epoch"] == 2
    assert unfreezing.events[0]["unfrozen"] == ["block5"]


def test_every_k_epochs_shorthand():
    unfreezing = GradualUnfreezing(every=2)
    assert [unfreezing.blocks_at(e, 5) for e in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    scheduled = GradualUnfreezing({1: 2, 3: "all"})
    assert [scheduled.blocks_at(e, 5) for e in range(5)] == [0, 2, 2, 5, 5]


def test_multi_optimizer_groups_receive_newly_unfrozen_variables():
    model = _vgg()
    opt = optimizers.discriminative(model, {"head": 1e-2, "block5": 1e-3},
                                    default_lr=0.0)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    start = {v.path: np.array(v) for v in model.weights}
    x, y = _xy()
    model.fit(x, y, batch_size=8, epochs=3, verbose=0,
              callbacks=[GradualUnfreezing({1: 2}, verbose=0)])
    rows = {r["group"]: r for r in optimizers.describe_groups(model.optimizer, model)}
    assert rows["block5"]["variables"] == 6
    assert rows["default"]["variables"] == 6  # block4, at rate 0
    changed = {v.path for v in model.weights
               if not np.array_equal(start[v.path], np.asarray(v))}
    assert "block5_conv1/kernel" in changed
    assert "block4_conv1/kernel" not in changed  # its group's rate is 0
    assert isinstance(model.optimizer, optimizers.DiscriminativeOptimizer)


@pytest.mark.parametrize("bn,moves", [("frozen", False), ("train", True)])
def test_batch_norm_statistics_follow_the_policy(bn, moves):
    model = tiny_classifier(2, bn=bn)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    start = {v.path: np.array(v) for v in model.weights}
    x, y = _xy()
    model.fit(x, y, batch_size=8, epochs=2, verbose=0,
              callbacks=[GradualUnfreezing({1: 1}, verbose=0)])
    stats = [v for v in model.weights if v.path.startswith("Conv_1_bn/moving")]
    moved = any(not np.array_equal(start[v.path], np.asarray(v)) for v in stats)
    assert moved == moves
    conv = [v for v in model.weights if v.path == "Conv_1/kernel"][0]
    assert not np.array_equal(start[conv.path], np.asarray(conv))


def test_plan_lists_epochs_and_parameters(capsys):
    model = _vgg()
    rows = GradualUnfreezing({1: 1, 2: "all"}).plan(model, epochs=3)
    assert [r["blocks"] for r in rows] == [0, 1, 5]
    assert rows[1]["unfrozen"] == ["block5"]
    assert rows[2]["unfrozen"] == ["block1", "block2", "block3", "block4"]
    head = 512 * 2 + 2
    assert rows[0]["trainable_params"] == head
    assert rows[2]["trainable_params"] == sum(
        int(np.prod(w.shape)) for w in model.weights)
    assert "block5" in capsys.readouterr().out


def test_bad_arguments_and_other_backends(monkeypatch):
    with pytest.raises(ValueError, match="not both"):
        GradualUnfreezing({1: 1}, every=2)
    with pytest.raises(ValueError, match="'lots'"):
        GradualUnfreezing({1: "lots"})
    with pytest.raises(ValueError, match="bn: .*received 'yes'"):
        GradualUnfreezing(every=1, bn="yes")
    model = _vgg()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    x, y = _xy(4)
    with pytest.raises(RuntimeError, match="kft.fine_tune"):
        model.fit(x, y, epochs=1, verbose=0,
                  callbacks=[GradualUnfreezing(every=1)])


def test_warmup_ramps_the_rate_after_an_unfreeze():
    model = _vgg()
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss="sparse_categorical_crossentropy")
    rates = []

    class Rates(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            rates.append(float(np.asarray(self.model.optimizer.learning_rate)))

    x, y = _xy(16)
    model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[
        GradualUnfreezing({1: 1}, warmup_steps=4, verbose=0), Rates()])
    np.testing.assert_allclose(rates, [0.1, 0.1, 0.025, 0.05, 0.075, 0.1],
                               rtol=1e-6)


def test_lr_find_restores_everything_and_suggests_inside_the_range(tmp_path):
    model = _vgg()
    kft.unfreeze(model, last_n_blocks=1)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss="sparse_categorical_crossentropy")
    x, y = _xy(32)
    data = kft.data.from_numpy(x, y, batch_size=8).train
    model.fit(data, epochs=1, verbose=0)  # non-trivial optimizer state
    weights = [np.array(v) for v in model.variables]
    state = [np.array(v) for v in model.optimizer.variables]
    result = kft.lr_find(model, data, start_lr=1e-6, end_lr=1.0, num_steps=20,
                         plot_path=str(tmp_path / "lr.png"))
    for v, w in zip(model.variables, weights):
        np.testing.assert_array_equal(np.asarray(v), w)
    for v, w in zip(model.optimizer.variables, state):
        np.testing.assert_array_equal(np.asarray(v), w)
    assert 1e-6 <= result.suggestion <= 1.0
    assert 1e-6 <= result.minimum <= 1.0
    assert len(result.losses) >= 3
    assert (tmp_path / "lr.png").stat().st_size > 0


def test_lr_find_scales_groups_together():
    model = _vgg()
    kft.unfreeze(model, last_n_blocks=1)
    opt = optimizers.discriminative(model, {"head": 1e-3, "block5": 1e-5})
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    x, y = _xy(32)
    seen = []

    class Ratio(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            groups = optimizers.describe_groups(self.model.optimizer, self.model)
            rows = {r["group"]: r["learning_rate"] for r in groups}
            seen.append(rows["head"] / rows["block5"])

    finder_data = kft.data.from_numpy(x, y, batch_size=8).train
    import kft.callbacks as callbacks_module

    original_fit = model.fit

    def fit_with_ratio(*args, **kwargs):
        kwargs["callbacks"] = list(kwargs.get("callbacks", [])) + [Ratio()]
        return original_fit(*args, **kwargs)

    model.fit = fit_with_ratio
    result = callbacks_module.lr_find(model, finder_data, num_steps=10)
    assert seen and np.allclose(seen, 100.0)
    rows = {r["group"]: r["learning_rate"]
            for r in optimizers.describe_groups(opt, model)}
    assert rows == pytest.approx({"head": 1e-3, "block5": 1e-5, "default": 1e-3})
    assert result.suggestion > 0


def test_fine_tune_gradual_policy_and_unfreeze_stage():
    x, y = _xy(16)
    model = _vgg()
    start = {v.path: np.array(v) for v in model.weights}
    histories = kft.fine_tune(model, (x, y), verbose=0, policy="gradual",
                              epochs=2, freeze_epochs=1, every=1)
    assert [h.stage for h in histories] == ["head", "gradual"]
    assert [h.epoch for h in histories] == [[0], [1, 2]]
    changed = {v.path for v in model.weights
               if not np.array_equal(start[v.path], np.asarray(v))}
    # Stage 2 epoch 0 opens 0 blocks, epoch 1 opens block5 only.
    assert "block5_conv3/kernel" in changed
    assert "block4_conv3/kernel" not in changed
    with pytest.raises(ValueError, match="policy"):
        kft.fine_tune(model, (x, y), policy="slanted", epochs=1)


def test_fine_tune_stage_lr_find_sets_the_rate():
    x, y = _xy(32)
    model = _vgg()
    histories = kft.fine_tune(model, (x, y), verbose=0, stages=[
        {"epochs": 1, "trainable": "head", "schedule": "cosine",
         "lr_find": {"start_lr": 1e-6, "end_lr": 1.0, "num_steps": 8}}])
    found = histories[0].lr_found
    assert 1e-6 <= found <= 1.0
