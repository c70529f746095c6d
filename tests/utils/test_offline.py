"""Downloads fail in seconds with one sentence; `--offline` / KFT_OFFLINE=1
refuse before any network call; local paths never touch the network.

No test needs the network: "no network" is `socket` patched to fail, to
hang, or to record that it was called.
"""

import os
import socket
import threading
import time

import numpy as np
import pytest

import kft
from kft.cli import main
from kft.utils import offline
from kft.utils.offline import NetworkUnavailableError

BOUND = 10.0  # seconds kft promises for a failed download


@pytest.fixture(autouse=True)
def _online_by_default(monkeypatch):
    """Each test starts with KFT_OFFLINE unset in effect ("0"), so that
    `kft --offline` setting it is undone after the test; no proxies."""
    monkeypatch.setenv(offline.OFFLINE_ENV, "0")
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def sockets(monkeypatch):
    """Records every lookup and connection; each fails as without a network."""
    calls = []

    def refuse(name):
        def call(*args, **kwargs):
            calls.append((name, args))
            raise OSError(101, "Network is unreachable (test)")
        return call

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    return calls


@pytest.fixture
def hanging_dns(monkeypatch):
    """Every DNS lookup hangs (until the test ends)."""
    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait(120)
        raise OSError("released")

    monkeypatch.setattr(socket, "getaddrinfo", hang)
    yield
    release.set()


def test_is_offline_reads_the_environment(monkeypatch):
    for value, expected in [("1", True), ("true", True), ("YES", True),
                            ("0", False), ("", False), ("false", False)]:
        monkeypatch.setenv("KFT_OFFLINE", value)
        assert offline.is_offline() is expected, value


def test_offline_refuses_without_any_socket_call(monkeypatch, sockets):
    monkeypatch.setenv("KFT_OFFLINE", "1")
    with pytest.raises(NetworkUnavailableError) as info:
        offline.require_network("the thing", "weights=None",
                                url="https://example.com")
    message = str(info.value)
    assert message == ("Not downloading the thing: kft is offline "
                       "(KFT_OFFLINE=1 or --offline); pass weights=None.")
    assert sockets == []


def test_no_network_fails_at_once_naming_asset_host_and_alternative(sockets):
    start = time.monotonic()
    with pytest.raises(NetworkUnavailableError) as info:
        offline.require_network("the ImageNet weights", "weights=None",
                                url="https://storage.googleapis.com/x.h5")
    assert time.monotonic() - start < 1.0
    message = str(info.value)
    assert message.startswith("Could not download the ImageNet weights: no "
                              "network (storage.googleapis.com unreachable")
    assert message.endswith("; pass weights=None.") and "\n" not in message
    assert [name for name, _ in sockets] == ["getaddrinfo"]


def test_a_hanging_dns_lookup_is_abandoned_within_the_bound(hanging_dns):
    start = time.monotonic()
    with pytest.raises(NetworkUnavailableError, match="took over 5 s"):
        offline.require_network("tfds data set 'x'", "data_dir=...",
                                url="http://download.tensorflow.org")
    elapsed = time.monotonic() - start
    assert offline.TIMEOUT - 0.1 <= elapsed < BOUND


def test_a_host_that_answers_passes(monkeypatch):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    try:
        assert offline.check_host("127.0.0.1", port, timeout=2.0) < 2.0
        offline.require_network("x", "y", url=f"http://127.0.0.1:{port}/a.h5")
        # Downloads go through a configured proxy: it is what must answer.
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
        offline.require_network("x", "y", url="https://no-such-host.invalid")
    finally:
        server.close()


def test_local_paths_never_check_even_offline(monkeypatch, sockets, tmp_path):
    monkeypatch.setenv("KFT_OFFLINE", "1")
    (tmp_path / "weights.h5").write_bytes(b"")
    offline.require_preset(str(tmp_path), "x")
    offline.require_preset(tmp_path / "weights.h5", "x")
    assert sockets == []
    with pytest.raises(NetworkUnavailableError, match="'hf://a/b'"):
        offline.require_preset("hf://a/b", "a local directory")


def test_preset_hosts(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("KAGGLE_API_ENDPOINT", raising=False)
    assert offline.preset_host("bert_tiny_en_uncased") == "https://www.kaggle.com"
    assert offline.preset_host("kaggle://keras/bert/keras/x/2") == (
        "https://www.kaggle.com")
    assert offline.preset_host("hf://timm/resnet18") == "https://huggingface.co"
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example")
    assert offline.preset_host("hf://timm/resnet18") == "https://hf-mirror.example"


def test_keras_cached_files_skip_the_check():
    """The check runs only when Keras would download: a file in its
    cache (conftest points KERAS_HOME at a temporary folder) never."""
    import keras

    from kft._keras_internals import before_keras_download

    cache = os.path.join(os.environ["KERAS_HOME"], "models")
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, "kft_cached.txt"), "w") as f:
        f.write("cached")
    seen = []

    def check(url):
        seen.append(url)
        raise NetworkUnavailableError("refused")

    with before_keras_download(check):
        path = keras.utils.get_file("kft_cached.txt", "https://x.invalid/a.txt",
                                    cache_subdir="models")
        assert open(path).read() == "cached" and seen == []
        with pytest.raises(NetworkUnavailableError, match="refused"):
            keras.utils.get_file("kft_missing.txt", "https://x.invalid/b.txt",
                                 cache_subdir="models")
    assert seen == ["https://x.invalid/b.txt"]


def test_imagenet_weights_offline_and_without_network(monkeypatch, sockets):
    from kft.backbones.blocks import WeightsUnavailableError

    def build():
        return kft.build_classifier("mobilenet_v2", 2, weights="imagenet",
                                    input_shape=(96, 96, 3), alpha=0.35)

    monkeypatch.setenv("KFT_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as info:
        build()
    assert sockets == []
    message = str(info.value)
    assert "ImageNet weights of backbone 'mobilenet_v2'" in message
    assert "kft is offline" in message and "weights=None" in message
    monkeypatch.setenv("KFT_OFFLINE", "0")
    start = time.monotonic()
    with pytest.raises(NetworkUnavailableError, match="storage.googleapis.com"):
        build()
    assert time.monotonic() - start < BOUND


def test_local_builds_work_offline(monkeypatch, sockets, tmp_path):
    """weights=None, a weights file and a keras-hub preset directory: no
    socket call with KFT_OFFLINE=1."""
    import keras_hub

    monkeypatch.setenv("KFT_OFFLINE", "1")
    model = kft.build_classifier("mobilenet_v2", 2, weights=None,
                                 input_shape=(32, 32, 3), alpha=0.35)
    path = str(tmp_path / "mine.weights.h5")
    model.get_layer("backbone").save_weights(path)
    again = kft.build_classifier("mobilenet_v2", 2, weights=path,
                                 input_shape=(32, 32, 3), alpha=0.35)
    np.testing.assert_array_equal(
        np.asarray(again.get_layer("backbone").weights[0]),
        np.asarray(model.get_layer("backbone").weights[0]))
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 64, 64], stackwise_num_blocks=[1, 1, 1],
        stackwise_num_strides=[1, 2, 2], block_type="basic_block",
        image_shape=(32, 32, 3))
    preset = tmp_path / "preset"
    backbone.save_to_preset(str(preset))
    keras_hub.layers.ImageConverter(image_size=(32, 32), scale=1 / 255
                                    ).save_to_preset(str(preset))
    classifier = kft.build_classifier(str(preset), 2)
    assert classifier.output_shape == (None, 2)
    assert sockets == []


def test_keras_hub_presets_refuse_offline(monkeypatch, sockets):
    from kft.backbones.image_presets import PresetUnavailableError

    monkeypatch.setenv("KFT_OFFLINE", "1")
    with pytest.raises(PresetUnavailableError) as info:
        kft.build_classifier("hf://timm/resnet18.a1_in1k", 2, weights=None,
                             input_shape=(32, 32, 3))
    assert isinstance(info.value, NetworkUnavailableError)
    assert "'hf://timm/resnet18.a1_in1k'" in str(info.value)
    assert "kft convert efficientnet-lite0" in str(info.value)
    with pytest.raises(NetworkUnavailableError, match="text preset 'bert_"):
        kft.build_text_classifier("bert_tiny_en_uncased", 2)
    with pytest.raises(NetworkUnavailableError, match="kft convert smollm2"):
        kft.build_causal_lm("llama3_8b_en")
    assert sockets == []


def test_tfds_download_fails_in_seconds(monkeypatch, sockets, tmp_path):
    start = time.monotonic()
    with pytest.raises(NetworkUnavailableError) as info:
        kft.data.from_tfds("tf_flowers", data_dir=str(tmp_path), download=True)
    assert time.monotonic() - start < BOUND
    message = str(info.value)
    assert "tfds data set 'tf_flowers'" in message
    assert "download.tensorflow.org" in message and "data_dir=" in message


def test_kft_run_offline_exits_2_with_one_line(sockets, tmp_path, capsys):
    start = time.monotonic()
    code = main(["run", "flowers_mobilenet_v2", "--offline", "--output-dir",
                 str(tmp_path / "run"), "--set", f"data.data_dir={tmp_path}"])
    assert time.monotonic() - start < BOUND
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kft: data.download: Not downloading tfds data "
                              "set 'tf_flowers': kft is offline")
    assert "data_dir=" in err[-1] and "Traceback" not in "".join(err)
    assert os.environ["KFT_OFFLINE"] == "1"  # for the runs it starts
    assert sockets == []


def test_kft_run_without_network_exits_2_naming_the_weights(sockets, tmp_path,
                                                            capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: r\nmodel: {backbone: mobilenet_v2, weights: imagenet, "
        "input_shape: [96, 96, 3], backbone_kwargs: {alpha: 0.35}}\n"
        "data: {source: builtin, name: fashion_mnist_holdout}\n"
        "stages: [{epochs: 1}]\n")
    start = time.monotonic()
    code = main(["run", str(recipe), "--output-dir", str(tmp_path / "run")])
    assert time.monotonic() - start < BOUND
    assert code == 2
    err = capsys.readouterr().err
    assert "kft: model.weights: Could not download the ImageNet weights of " \
           "backbone 'mobilenet_v2': no network" in err
    assert "weights=None" in err
