"""`kft tune`: search spaces in recipes, studies on Optuna, resume after
SIGKILL, pruning, results (tiny models, a few steps)."""

import pytest
import yaml

from kft.cli import main
from kft.recipes import RecipeError
from kft.recipes import load_recipe

SPACE = {
    "stages.1.learning_rate": {"loguniform": [1.0e-5, 1.0e-2]},
    "stages.1.trainable.last_n_blocks": {"int": [1, 4]},
    "data.batch_size": {"choice": [4, 8]},
}


def _recipe(tmp_path, space=None, epochs=(1, 2), **search):
    """A tiny image recipe (MobileNetV2 alpha 0.35, 32 px, 24 images) with
    a `search:` section."""
    import numpy as np
    from conftest import make_images

    x, y = make_images(24, classes=2)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y)
    recipe = {
        "name": "tiny",
        "model": {"backbone": "mobilenet_v2", "input_shape": [32, 32, 3],
                  "backbone_kwargs": {"alpha": 0.35}, "weights": None},
        "data": {"source": "numpy", "path": str(tmp_path / "d.npz"),
                 "batch_size": 8, "validation_split": 0.25, "shuffle": False},
        "callbacks": {"checkpoints": False},
        "stages": [
            {"name": "head", "epochs": epochs[0], "steps_per_epoch": 2},
            {"name": "top", "epochs": epochs[1], "steps_per_epoch": 2,
             "trainable": {"last_n_blocks": 2}, "learning_rate": 1.0e-3}],
        "search": {"space": SPACE if space is None else space, **search},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


# === The search: section ===

def test_a_search_section_validates_and_kft_run_ignores_it(tmp_path):
    config = load_recipe(_recipe(tmp_path))
    assert config.search.space["stages.1.learning_rate"].kind == "loguniform"
    assert config.search.trials == 20 and config.search.pruner == "median"
    from kft.recipes.loader import resolved

    # The resolved recipe keeps the space as written, and reloads.
    data = resolved(config)
    assert data["search"]["space"]["data.batch_size"] == {"choice": [4, 8]}
    assert "search" not in resolved(load_recipe("quickstart"))


@pytest.mark.parametrize("key, distribution, message", [
    ("stages.1.learning_rat", {"loguniform": [1e-5, 1e-2]},
     "search.space.stages.1.learning_rat: unknown key "
     "(did you mean 'stages.1.learning_rate'?)"),
    ("stages.1.learning_rate", {"loguniform": [0, 1e-2]},
     "search.space.stages.1.learning_rate: loguniform needs low > 0"),
    ("stages.1.learning_rate", {"uniform": [0.1, 0.01]},
     "search.space.stages.1.learning_rate: uniform needs low < high"),
    ("stages.1.learning_rate", {"uniform": [0.1, 0.1]},
     "search.space.stages.1.learning_rate: uniform needs low < high"),
    ("data.batch_size", {"choice": []},
     "search.space.data.batch_size: choice needs at least one value"),
    ("lora.rank", {"int": [2, 8]},
     "search.space.lora.rank: lora is not set in this recipe"),
    ("stages.5.epochs", {"int": [1, 2]},
     "search.space.stages.5.epochs: stages is a list of 2 item(s)"),
    ("data.batch_size", {"uniform": [4, 16]},
     "search.space.data.batch_size: an integer key"),
    ("stages.1.trainable.last_n_blocks", {"int": [-1, 3]},
     "search.space.stages.1.trainable.last_n_blocks: the recipe is invalid "
     "with -1"),
    ("stages.1.learning_rate", {"logunifrm": [1e-5, 1e-2]},
     "unknown distribution 'logunifrm' (did you mean 'loguniform'?)"),
    ("stages.1.learning_rate", {"int": [1.5, 3]},
     "int takes two integers"),
])
def test_a_bad_space_exits_2_naming_the_key_before_any_training(
        tmp_path, capsys, key, distribution, message):
    path = _recipe(tmp_path, {key: distribution})
    with pytest.raises(RecipeError, match="search.space"):
        load_recipe(path)
    assert main(["validate", path]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_search_settings_are_checked(tmp_path):
    for search, key in [({"pruner": "asha"}, "search.pruner"),
                        ({"trials": 0}, "search.trials"),
                        ({"direction": "up"}, "search.direction"),
                        ({"sampler": "tpe"}, "search.sampler")]:
        with pytest.raises(RecipeError, match=key):
            load_recipe(_recipe(tmp_path, **search))
