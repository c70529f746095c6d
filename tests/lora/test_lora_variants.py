"""The LoRA variants: DoRA, PiSSA / OLoRA / Gaussian initialisations,
LoRA for Conv2D and Embedding, LoRA+, combined and switched adapters.

Each variant on a tiny model: a fresh adapter changes nothing, merging is
exact, only the adapter variables train (every other weight bit-identical
after `fit`), and adapter files and `.keras` files keep it.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_images
from conftest import tiny_classifier

from kft.lora.adapters import active_adapter
from kft.lora.adapters import combine_adapters
from kft.lora.adapters import set_adapter
from kft.lora.base import lora_layers
from kft.lora.conv import LoRAConv2D
from kft.lora.dense import LoRADense
from kft.lora.dense import LoRAEinsumDense
from kft.lora.embedding import LoRAEmbedding
from kft.lora.embedding import LoRAReversibleEmbedding
from kft.lora.io import load_adapter
from kft.lora.io import save_adapter
from kft.lora.model import apply_lora
from kft.lora.model import merge_lora

ADAPTER_NAMES = ("lora_a", "lora_b", "lora_magnitude")
LORA_CLASSES = (LoRADense, LoRAEinsumDense, LoRAConv2D, LoRAEmbedding,
                LoRAReversibleEmbedding)


def _mlp(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    x = keras.layers.Dense(5, activation="tanh", name="query")(inputs)
    x = keras.layers.EinsumDense("ab,bcd->acd", (3, 4), bias_axes="cd",
                                 name="value")(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x))


def _convnet(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same",
                            name="block_1_project")(inputs)
    x = keras.layers.Conv2D(5, 1, use_bias=False, name="block_2_project")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x))


def _embedder(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,), dtype="int32")
    x = keras.layers.Embedding(20, 6, name="token_embedding")(inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x))


def _gemma_like(seed=0):
    """Gemma's attention layouts: a query kernel (heads, hidden, head_dim)
    that the adapters see transposed, and an output projection."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4, 6))
    x = keras.layers.EinsumDense("btd,ndh->btnh", (4, 2, 3), name="query")(inputs)
    x = keras.layers.EinsumDense("btnh,nhd->btd", (4, 5),
                                 name="attention_output")(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x))


def _data(builder, n=16):
    rng = np.random.default_rng(0)
    x = {_mlp: lambda: rng.normal(size=(n, 6)),
         _gemma_like: lambda: rng.normal(size=(n, 4, 6)),
         _convnet: lambda: rng.normal(size=(n, 8, 8, 3)),
         _embedder: lambda: rng.integers(0, 20, (n, 5))}[builder]()
    x = x.astype("int32" if builder is _embedder else "float32")
    return x, rng.normal(size=(n, 2)).astype("float32")


DENSE = ("query", "value")
CONV = r"block_\d+_project$"
CASES = {
    "dora": (_mlp, {"targets": DENSE, "use_dora": True}),
    "pissa": (_mlp, {"targets": DENSE, "init": "pissa"}),
    "olora": (_mlp, {"targets": DENSE, "init": "olora"}),
    "gaussian": (_mlp, {"targets": DENSE, "init": "gaussian"}),
    "einsum_pissa_dora": (_gemma_like, {"targets": ("query", "attention_output"),
                                        "init": "pissa", "use_dora": True}),
    "conv": (_convnet, {"targets": CONV}),
    "conv_dora": (_convnet, {"targets": CONV, "use_dora": True}),
    "embedding": (_embedder, {"targets": "token_embedding"}),
    "embedding_dora": (_embedder, {"targets": "token_embedding", "use_dora": True}),
}


def _adapted(case, seed=0):
    builder, options = CASES[case]
    model = builder(seed)
    apply_lora(model, rank=2, alpha=4, **options)
    return model


def _perturb(model, seed=1):
    """Gives every adapter a non-zero update (and DoRA magnitudes other
    values than the column norms), so that outputs depend on them."""
    rng = np.random.default_rng(seed)
    for layer in lora_layers(model):
        for variable in (layer.lora_a, layer.lora_b):
            noise = rng.normal(size=variable.shape).astype("float32") * 0.3
            variable.assign(np.asarray(variable) + noise)
        if layer.use_dora:
            factor = rng.uniform(0.7, 1.3, layer.lora_magnitude.shape)
            layer.lora_magnitude.assign(
                np.asarray(layer.lora_magnitude) * factor.astype("float32"))


def _close(actual, expected, tol=1e-5):
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol)


def _outputs(model, x):
    # Eager calls: no predict function to trace after every change.
    return np.asarray(model(x, training=False))


def _adapter_paths(model):
    return {w.path for layer in lora_layers(model) for w in layer.trainable_weights}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fresh_adapters_change_nothing_and_merge_is_exact(case):
    builder, options = CASES[case]
    model = builder()
    x, _ = _data(builder)
    before = _outputs(model, x)
    assert apply_lora(model, rank=2, alpha=4, **options) == 2 - (
        builder is _embedder)
    _close(_outputs(model, x), before)
    _perturb(model)
    want = _outputs(model, x)
    assert np.abs(want - before).max() > 1e-3  # the adapters count
    for layer in lora_layers(model):
        layer.merge()
    _close(_outputs(model, x), want)
    for layer in lora_layers(model):
        layer.unmerge()
    _close(_outputs(model, x), want)
    merge_lora(model)
    assert not any(isinstance(layer, LORA_CLASSES) for layer in model.layers)
    _close(_outputs(model, x), want)


@pytest.mark.parametrize("case", sorted(CASES))
def test_only_the_adapter_variables_train(case):
    model = _adapted(case)
    x, y = _data(CASES[case][0])
    trainable = {w.path for w in model.trainable_weights}
    assert trainable == _adapter_paths(model)
    assert {p.rsplit("/", 1)[1] for p in trainable} <= set(ADAPTER_NAMES)
    before = {w.path: np.array(w) for w in model.weights}
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(x, y, batch_size=8, epochs=3, verbose=0)
    changed = {w.path for w in model.weights
               if not np.array_equal(before[w.path], np.asarray(w))}
    assert changed == trainable


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_files_keep_the_variant(case, tmp_path):
    builder, options = CASES[case]
    base = builder(seed=3)
    base_weights = str(tmp_path / "base.weights.h5")
    base.save_weights(base_weights)
    model = _adapted(case, seed=3)
    _perturb(model)
    x, _ = _data(builder)
    want = model.predict(x, verbose=0)
    path = str(tmp_path / "adapter.npz")
    save_adapter(model, path)

    fresh = builder(seed=9)
    fresh.load_weights(base_weights)
    load_adapter(fresh, path)
    _close(fresh.predict(x, verbose=0), want)
    layers = lora_layers(fresh)
    assert all(layer.use_dora == options.get("use_dora", False) for layer in layers)
    if options.get("init") in ("pissa", "olora"):
        # Converted for the original base: [A | A0], [B ; -B0], rank 2 r.
        assert {layer.adapter_rank for layer in layers} == {4}
        with pytest.raises(ValueError, match="residuals"):
            load_adapter(model, path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_keras_round_trip_keeps_the_variant(case, tmp_path):
    model = _adapted(case)
    _perturb(model)
    x, _ = _data(CASES[case][0])
    path = str(tmp_path / "m.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    _close(reloaded.predict(x, verbose=0), model.predict(x, verbose=0), 1e-6)
    assert ([type(layer) for layer in lora_layers(reloaded)]
            == [type(layer) for layer in lora_layers(model)])
    assert (sorted(w.path for w in reloaded.trainable_weights)
            == sorted(w.path for w in model.trainable_weights))
    for old, new in zip(lora_layers(model), lora_layers(reloaded)):
        assert new._lora_config() == old._lora_config()


def test_dora_output_is_the_formula_and_its_norm_gets_no_gradient():
    layer = LoRADense(3, rank=2, alpha=4, use_dora=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 4)).astype("float32")
    layer.build(x.shape)
    kernel, bias = np.asarray(layer._kernel), np.asarray(layer.bias)
    _close(np.asarray(layer.lora_magnitude), np.linalg.norm(kernel, axis=0))
    layer.lora_b.assign(rng.normal(size=(2, 3)).astype("float32"))
    layer.lora_magnitude.assign(rng.uniform(0.5, 2, 3).astype("float32"))
    a, b = np.asarray(layer.lora_a), np.asarray(layer.lora_b)
    m = np.asarray(layer.lora_magnitude)
    weight = kernel + 2.0 * a @ b
    factor = m / np.linalg.norm(weight, axis=0)
    _close(np.asarray(layer(x)), x @ weight * factor + bias)

    upstream = rng.normal(size=(5, 3)).astype("float32")
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x) * upstream)
    grad_a, grad_m = tape.gradient(loss, [layer.lora_a, layer.lora_magnitude])
    # The norm is a constant (PEFT's detach): only the factor's numerator
    # and the update carry gradients.
    _close(np.asarray(grad_a), 2.0 * x.T @ ((upstream * factor) @ b.T), 1e-4)
    _close(np.asarray(grad_m),
           ((x @ weight) * upstream).sum(0) / np.linalg.norm(weight, axis=0), 1e-4)


@pytest.mark.parametrize("case", sorted(c for c in CASES if "dora" in c))
def test_dora_norm_without_the_full_matrix_equals_the_full_matrix_norm(case):
    """`||W||^2 + 2 s <W, A B> + s^2 ||A B||^2` per column (what a step
    computes) is the norm of `W + s A B` (what it avoids forming)."""
    model = _adapted(case)
    _perturb(model)
    for layer in lora_layers(model):
        kernel = np.asarray(layer._flat_kernel())
        weight = kernel + layer.scale * (np.asarray(layer.lora_a)
                                         @ np.asarray(layer.lora_b))
        _close(np.asarray(layer._column_norms()),
               np.linalg.norm(weight, axis=0), 1e-6)


def test_pissa_and_olora_factor_the_kernel_as_peft_does():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(6, 5)).astype("float32")
    layers = {}
    for init in ("pissa", "olora"):
        layer = LoRADense(5, rank=2, alpha=4, init=init,
                          kernel_initializer=keras.initializers.Constant(kernel))
        layer.build((None, 6))
        a, b = np.asarray(layer.lora_a), np.asarray(layer.lora_b)
        residual = np.asarray(layer._kernel)
        _close(residual + layer.scale * a @ b, kernel)
        _close(np.asarray(layer.lora_a_init), a)
        layers[init] = (a, b, residual)
    u, s, vt = np.linalg.svd(kernel, full_matrices=False)
    a, b, residual = layers["pissa"]
    _close(2.0 * a @ b, (u[:, :2] * s[:2]) @ vt[:2], 1e-4)
    _close(np.linalg.svd(residual, compute_uv=False)[:3], s[2:], 1e-4)
    a, b, _ = layers["olora"]
    _close(b @ b.T, np.eye(2), 1e-5)  # B = Q_r^T: orthonormal rows
    with pytest.raises(ValueError, match="rank must be <= 5"):
        LoRADense(5, rank=6, init="pissa").build((None, 6))
    with pytest.raises(ValueError, match="init must be one of"):
        apply_lora(_mlp(), targets=DENSE, init="kaiming")


def test_quantized_bases_refuse_dora_and_pissa_and_dora_stays_float():
    import warnings

    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.quantize("int8")
    for options in ({"use_dora": True}, {"init": "pissa"}):
        with pytest.raises(ValueError, match="need its float kernel"):
            apply_lora(model, targets=DENSE, **options)
    model = _mlp()
    apply_lora(model, targets=DENSE, rank=2, use_dora=True)
    with pytest.warns(UserWarning, match="DoRA"):
        model.quantize("int8")
    assert all(layer.quantization_mode is None for layer in lora_layers(model))
    assert model.get_layer("head").quantization_mode == "int8"


def _bert(seed=0):
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=100, num_layers=2, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=16)
    outputs = keras.layers.Dense(2, name="head")(
        backbone(backbone.input)["pooled_output"])
    return keras.Model(backbone.input, outputs)


def _bert_inputs(n=8):
    rng = np.random.default_rng(0)
    return {"token_ids": rng.integers(1, 100, (n, 16)).astype("int32"),
            "segment_ids": np.zeros((n, 16), "int32"),
            "padding_mask": np.ones((n, 16), "int32")}


def test_dora_on_a_keras_hub_backbone_and_its_token_embedding(tmp_path):
    model = _bert()
    x = _bert_inputs()
    before = model.predict(x, verbose=0)
    apply_lora(model, targets=("query", "value", "token_embedding"), rank=2,
               use_dora=True)
    layers = lora_layers(model)
    assert {type(layer) for layer in layers} == {LoRAEinsumDense,
                                                 LoRAReversibleEmbedding}
    _close(model.predict(x, verbose=0), before)
    _perturb(model)
    want = model.predict(x, verbose=0)
    embedding = next(lr for lr in layers if isinstance(lr, LoRAReversibleEmbedding))
    hidden = np.random.default_rng(2).normal(size=(2, 3, 16)).astype("float32")
    logits = np.asarray(embedding(hidden, reverse=True))

    path = str(tmp_path / "bert_dora.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    assert len(lora_layers(reloaded)) == 5
    _close(reloaded.predict(x, verbose=0), want, 1e-6)
    merge_lora(model)
    _close(model.predict(x, verbose=0), want)
    # The tied LM-head direction saw the update too, so it merges exactly.
    assert type(embedding) is keras.layers.ReversibleEmbedding  # merged back
    _close(np.asarray(embedding(hidden, reverse=True)), logits)


def test_mobilenet_pointwise_convolutions_take_lora():
    model = tiny_classifier()
    x, y = make_images(8)
    # block_1 ... block_16 (block 0 is "expanded_conv_project").
    assert apply_lora(model, targets=CONV, rank=2, trainable=("head_output",)) == 16
    layers = lora_layers(model)
    assert all(isinstance(layer, LoRAConv2D) and layer.kernel_size == (1, 1)
               for layer in layers)
    before = {w.path: np.array(w) for w in model.weights}
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=2, verbose=0)
    changed = {w.path for w in model.weights
               if not np.array_equal(before[w.path], np.asarray(w))}
    assert changed <= _adapter_paths(model) | {"head_output/kernel",
                                               "head_output/bias"}
    assert {f"{layer.path}/lora_b" for layer in layers} <= changed


def _linear(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    return keras.Model(inputs, keras.layers.Dense(3, name="query")(inputs))


def _named(tmp_path, model, values):
    """Saves one adapter per (name, seed) and loads them all by name."""
    layer = lora_layers(model)[0]
    for name, seed in values.items():
        rng = np.random.default_rng(seed)
        layer.lora_a.assign(rng.normal(size=layer.lora_a.shape).astype("float32"))
        layer.lora_b.assign(rng.normal(size=layer.lora_b.shape).astype("float32"))
        save_adapter(model, str(tmp_path / f"{name}.npz"))
    for name in values:
        load_adapter(model, str(tmp_path / f"{name}.npz"), name=name)


def test_combining_adapters_by_cat_is_exact(tmp_path):
    model = _linear()
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    base = model.predict(x, verbose=0)
    apply_lora(model, targets="query", rank=2, alpha=4)
    _named(tmp_path, model, {"a": 1, "b": 2})
    outputs = {}
    for name in ("a", "b"):
        set_adapter(model, name)
        outputs[name] = model.predict(x, verbose=0)
    scale = lora_layers(model)[0].scale
    assert combine_adapters(model, {"a": 0.5, "b": -1.0}, name="ab") == 4
    layer = lora_layers(model)[0]
    assert (layer.adapter_rank, layer.scale) == (4, scale)
    _close(model.predict(x, verbose=0), outputs["b"])  # still "b", padded
    set_adapter(model, "ab")
    want = base + 0.5 * (outputs["a"] - base) - (outputs["b"] - base)
    _close(model.predict(x, verbose=0), want)
    set_adapter(model, "a")
    _close(model.predict(x, verbose=0), outputs["a"])

    assert combine_adapters(model, {"a": 0.25, "b": 4.0}, name="lin",
                            combination="linear") == 4
    with pytest.raises(ValueError, match="exists already"):
        combine_adapters(model, {"a": 1.0}, name="ab")
    with pytest.raises(ValueError, match="combination must be one of"):
        combine_adapters(model, {"a": 1.0}, name="x", combination="svd")


def test_switching_adapters_in_a_compiled_model_does_not_retrace(tmp_path):
    model = _linear()
    apply_lora(model, targets="query", rank=2)
    _named(tmp_path, model, {"a": 1, "b": 2})
    traces = {"train": 0, "predict": 0}
    train_step, predict_step = model.train_step, model.predict_step

    def counted_train(data):
        traces["train"] += 1  # Python runs once per trace
        return train_step(data)

    def counted_predict(data):
        traces["predict"] += 1
        return predict_step(data)

    model.train_step, model.predict_step = counted_train, counted_predict
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    x = np.random.default_rng(0).normal(size=(8, 6)).astype("float32")
    y = np.zeros((8, 3), "float32")
    outputs = {}
    for name in ("a", "b", "a", "b"):
        set_adapter(model, name)
        assert active_adapter(model) == name
        model.fit(x, y, batch_size=4, epochs=1, verbose=0)
        outputs[name] = model.predict(x, batch_size=4, verbose=0)
    # Loading one more adapter by name assigns into the same variables too.
    load_adapter(model, str(tmp_path / "a.npz"), name="a_again")
    model.predict(x, batch_size=4, verbose=0)
    assert traces == {"train": 1, "predict": 1}
    assert np.abs(outputs["a"] - outputs["b"]).max() > 1e-2


def test_loraplus_moves_b_by_ratio_times_the_rate():
    from kft.training.optimizers import describe_groups
    from kft.training.optimizers import loraplus

    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(3, name="query")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))
    apply_lora(model, targets="query", rank=2, trainable=("head",))
    layer = lora_layers(model)[0]
    layer.lora_b.assign(np.full(layer.lora_b.shape, 0.5, "float32"))
    optimizer = loraplus(model, 0.01, ratio=4, optimizer="sgd")
    rates = {row["group"]: row["learning_rate"]
             for row in describe_groups(optimizer, model)}
    assert rates == pytest.approx({"default": 0.01, "lora_a": 0.01, "lora_b": 0.04})
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    variables = model.trainable_variables
    before = [np.array(v) for v in variables]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x) ** 2)
    grads = tape.gradient(loss, variables)
    optimizer.apply(grads, variables)
    for variable, old, grad in zip(variables, before, grads):
        rate = 0.04 if variable.path.endswith("lora_b") else 0.01
        _close(np.asarray(variable), old - rate * np.asarray(grad), 1e-6)

    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, 10, 0.5)
    optimizer = loraplus(model, schedule, ratio=16)
    rates = {row["group"]: row["learning_rate"]
             for row in describe_groups(optimizer, model)}
    assert rates == {"default": "ExponentialDecay", "lora_a": "ExponentialDecay",
                     "lora_b": "ScaledSchedule"}
    with pytest.raises(ValueError, match="ratio=0"):
        loraplus(model, 0.01, ratio=0)
    with pytest.raises(ValueError, match="no LoRA layers"):
        loraplus(_linear(), 0.01)
