import pytest

from cnntrain.config import build_config, load_recipe
from cnntrain.errors import ConfigError


def test_precedence_defaults_then_recipe_then_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: resnet56\nlr: 0.2\nbatch-size: 64\n")
    cfg = build_config(str(recipe), lr=0.05)
    assert (cfg.model, cfg.lr, cfg.batch_size, cfg.epochs) == ("resnet56", 0.05, 64, 10)


def test_recipe_with_a_python_tag_is_refused(tmp_path):
    recipe = tmp_path / "evil.yaml"
    recipe.write_text("model: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match="evil.yaml"):
        load_recipe(str(recipe))
    assert not (tmp_path / "pwned").exists()


def test_unknown_option_and_bad_choice_suggest_the_right_one():
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        build_config(bach_size=3)
    with pytest.raises(ConfigError, match="did you mean 'nesterov'"):
        build_config(optimizer="nesterof")


def test_nnabla_device_alias_and_type_errors():
    assert build_config(device="cudnn").device == "cuda"
    with pytest.raises(ConfigError, match="'lr'"):
        build_config(lr="fast")
    with pytest.raises(ConfigError, match="--loss-scale applies to --precision fp16"):
        build_config(loss_scale=128)


def test_data_set_defaults_sit_between_the_defaults_and_the_recipe(tmp_path):
    assert build_config(dataset="mnist").batch_size == 32
    assert build_config(dataset="mnist", batch_size=100).batch_size == 100
    assert build_config(dataset="cifar10").batch_size == 128
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dataset: mnist\nbatch-size: 64\n")
    assert build_config(str(recipe)).batch_size == 64
