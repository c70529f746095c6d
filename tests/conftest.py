"""Shared test set-up: offline, quiet, deterministic, tiny."""

import os
import socket
import tempfile

# Before Keras is imported: no cached downloads from ~/.keras, quiet TF.
os.environ["KERAS_HOME"] = tempfile.mkdtemp(prefix="kft-keras-home-")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


@pytest.fixture(autouse=True)
def _no_full_collection_per_deleted_variable(monkeypatch):
    """Keras runs `gc.collect()` whenever a layer deletes a variable (LoRA
    conversion and merging, `quantize`). Late in a long test session the
    heap holds many models and each full collection takes seconds; the
    tests do not depend on it (Python's generational collector still
    runs)."""
    import gc

    monkeypatch.setattr(gc, "collect", lambda *args, **kwargs: 0)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails, as on an offline machine."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled by the kft test suite")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def make_images(n=24, size=32, classes=3, seed=0, channels=3):
    """Separable toy images: each class has its own brightness pattern."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.uniform(0, 60, size=(n, size, size, channels))
    for c in range(classes):
        x[y == c, (c * size) // classes : ((c + 1) * size) // classes] += 180
    return x.astype("float32"), y.astype("int32")


def tiny_classifier(num_classes=3, size=32, **kwargs):
    import kft

    return kft.build_classifier(
        "mobilenet_v2", num_classes, weights=None,
        input_shape=(size, size, 3), alpha=0.35, **kwargs,
    )


def changed_after_fit(model, x, y, epochs=1, learning_rate=1e-2):
    """Compiles with Adam, fits, and returns the paths of the weights that
    changed."""
    before = {w.path: np.array(w) for w in model.weights}
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=epochs, verbose=0)
    return {w.path for w in model.weights
            if not np.array_equal(before[w.path], np.asarray(w))}


# --- Large tests in CI -----------------------------------------------------
# CI installs every large asset (.ci/run), so a `large` test that skips there
# means an install step broke: under CI=true it fails, with the skip reason.
# Outside CI a skip stays a skip. The terminal summary counts the large
# tests that ran, so a CI log says how much of the real-model side it tested.

def _in_ci():
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if item.get_closest_marker("large") is None:
        return
    if report.skipped and _in_ci():
        reason = (report.longrepr[2] if isinstance(report.longrepr, tuple)
                  else str(report.longrepr))
        report.outcome = "failed"
        report.longrepr = (f"large test skipped under CI=true (every asset is "
                           f"installed there, so an install step broke): "
                           f"{reason}")
    report.user_properties.append(("large", report.outcome))


def pytest_terminal_summary(terminalreporter):
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for outcome in counts:
        for report in terminalreporter.stats.get(outcome, []):
            # pytest-xdist sends the properties back as lists
            properties = [tuple(p) for p in getattr(report, "user_properties", ())]
            if ("large", outcome) in properties:
                if report.when == "call" or outcome != "passed":
                    counts[outcome] += 1
    terminalreporter.write_line(
        f"large tests run: {counts['passed'] + counts['failed']} "
        f"({counts['failed']} of them failed; {counts['skipped']} skipped)")
