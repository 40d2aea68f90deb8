import pytest
import torch

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
        assert "expect" in text.lower() or "accuracy" in text, name


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_two_steps_on_tiny_synthetic_data(tmp_path, name):
    recipe = load_recipe(name)
    shape = list(get_spec(recipe["model"]).input_size)
    options = tiny(tmp_path / name, synthetic_shape=shape, synthetic_size=16, batch_size=4, max_steps=2)
    for key in ("model", "epochs", "lr", "precision"):  # the recipe's own
        options.pop(key)
    if recipe.get("pretrained"):  # published weights are a download, and tests are offline
        options["pretrained"] = ""
    if recipe.get("precision") == "fp16" and not torch.cuda.is_available():
        # fp16 autocast has no fast CPU kernels (about 6x slower than fp32 here): smoke-test in bf16.
        options.update(precision="bf16", loss_scale=0.0)
    result = cnntrain.train(recipe=name, **options)
    assert result.steps == 2
    assert cnntrain.build_config(str(result.run_dir / "config.yaml")).model == recipe["model"]
