import pytest

import cnntrain
from cnntrain.config import RECIPE_DIR, load_recipe
from cnntrain.models import get_spec
from tests.helpers import tiny

RECIPES = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def test_every_recipe_has_a_header_saying_what_it_reproduces():
    assert len(RECIPES) >= 7
    for name in RECIPES:
        text = (RECIPE_DIR / f"{name}.yaml").read_text()
        assert text.startswith("# "), name
        assert "Expect" in text or "accuracy" in text, name


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_two_steps_on_tiny_synthetic_data(tmp_path, name):
    recipe = load_recipe(name)
    shape = list(get_spec(recipe["model"]).input_size)
    options = tiny(tmp_path / name, synthetic_shape=shape, synthetic_size=16, batch_size=4, max_steps=2)
    for key in ("model", "epochs", "lr"):
        options.pop(key)
    result = cnntrain.train(recipe=name, **options)
    assert result.steps == 2
    assert cnntrain.build_config(str(result.run_dir / "config.yaml")).model == recipe["model"]
