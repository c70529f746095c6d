"""keras.distribution (`distribution: data_parallel | model_parallel`): the
recipe section and the errors here; the training itself on JAX with 4
host devices, in a subprocess (`jax_distribution_subset.py`)."""

import os
import subprocess
import sys

import pytest
import yaml

import kft
from kft.recipes import RecipeError
from kft.recipes import load_recipe

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
def test_data_and_model_parallel_on_4_jax_host_devices():
    pytest.importorskip("jax", reason="jax not installed (test extra: jax[cpu])")
    env = {**os.environ, "KERAS_BACKEND": "jax",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p",
         "no:cacheprovider",
         os.path.join(HERE, "jax_distribution_subset.py")],
        cwd=HERE, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "5 passed" in result.stdout, result.stdout[-2000:]


def test_keras_distributions_need_jax_and_say_what_to_use_instead():
    import keras

    if keras.backend.backend() == "jax":
        pytest.skip("checks the message on the other backends")
    backend = keras.backend.backend()
    with pytest.raises(ValueError, match=(
            rf"'data_parallel' uses keras.distribution.*JAX backend only "
            rf"\(KERAS_BACKEND={backend}\).*'mirrored'")):
        kft.distribute.make_distribution("data_parallel")
    with pytest.raises(ValueError, match="JAX backend only"):
        with kft.distribute.keras_distribution("model_parallel",
                                               {"model": 2}, layout="x"):
            pass
    with pytest.raises(ValueError, match="keras.distribution"):
        kft.distribute.make_strategy("data_parallel")
    # tf.distribute names pass through: the runner enters it for any name.
    with kft.distribute.keras_distribution("none") as distribution:
        assert distribution is None


@pytest.mark.parametrize("name,mesh,needle", [
    ("data_parallel", {"batch": 2, "model": 2}, "batch axis only"),
    ("model_parallel", {"batch": 4}, "model axis"),
    ("model_parallel", {"model": 0}, "mesh.model=0"),
    ("model_parallel", {"model": True}, "mesh.model=True"),
    ("model_parallel", {"rows": 2, "model": 2}, "Unknown mesh axis 'rows'"),
    ("pipeline", None, "Unknown keras distribution 'pipeline'"),
])
def test_mesh_errors_name_the_value(name, mesh, needle):
    with pytest.raises(ValueError, match=needle):
        kft.distribute.check_mesh(name, mesh)


def _recipe(tmp_path, distribution, causal=True):
    model = ({"causal_lm": str(tmp_path)} if causal else
             {"backbone": "mobilenet_v2", "input_shape": [32, 32, 3]})
    data = ({"source": "sft_file", "path": str(tmp_path / "sft.jsonl")}
            if causal else {"source": "builtin", "name": "fashion_mnist_holdout"})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "r", "model": model, "data": data,
        "distribution": distribution, "stages": [{"epochs": 1}]}))
    return str(path)


def test_recipe_distribution_section_takes_keras_strategies_and_a_mesh(tmp_path):
    config = load_recipe(_recipe(tmp_path, {"strategy": "model_parallel",
                                            "mesh": {"batch": 2, "model": 2}}))
    assert config.distribution.mesh == {"batch": 2, "model": 2}
    config = load_recipe(_recipe(tmp_path, "data_parallel", causal=False))
    assert config.distribution.strategy == "data_parallel"
    assert config.distribution.mesh is None
    assert load_recipe(_recipe(tmp_path, "mirrored", causal=False))


@pytest.mark.parametrize("distribution,causal,needle", [
    ({"strategy": "mirrored", "mesh": {"batch": 2}}, False,
     "mesh applies to strategies ['data_parallel', 'model_parallel'] only"),
    ({"strategy": "model_parallel", "mesh": {"batch": 2, "model": -1}}, True,
     "mesh.model=-1"),
    ({"strategy": "model_parallel", "mesh": {"batch": "2", "model": 2}}, True,
     "distribution.mesh.batch"),
    ({"strategy": "model_parallel"}, False, "for other models use data_parallel"),
    ("mirrored", True, "tf.distribute strategies do not apply to causal-LM"),
    ("horovod", False, "distribution.strategy"),
])
def test_bad_distribution_sections_name_the_key(tmp_path, distribution, causal,
                                                needle):
    with pytest.raises(RecipeError) as info:
        load_recipe(_recipe(tmp_path, distribution, causal))
    assert needle in str(info.value)
