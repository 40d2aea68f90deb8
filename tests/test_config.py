import copy
import dataclasses
import pickle

import pytest

from cnntrain.config import (
    OPTIONS,
    SECTIONS,
    ComputeConfig,
    OptimConfig,
    SyncConfig,
    TrainConfig,
    build_config,
    config_field_names,
    config_from_dict,
    load_recipe,
    save_config,
)
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
        build_config(loss_scale=128, precision="fp32")


def test_data_set_defaults_sit_between_the_defaults_and_the_recipe(tmp_path):
    assert build_config(dataset="mnist").batch_size == 32
    assert build_config(dataset="mnist", batch_size=100).batch_size == 100
    assert build_config(dataset="cifar10").batch_size == 128
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dataset: mnist\nbatch-size: 64\n")
    assert build_config(str(recipe)).batch_size == 64


# ------------------------------------------------------------------------------------- sections


@pytest.mark.parametrize("options, message", [
    (dict(max_image_pixels=-1), "--max-image-pixels must be >= 0"),
    (dict(batch_size=0), "--batch-size must be positive, got 0"),
    (dict(epochs=0), "nothing to train"),
    (dict(lr_schedule="multistep"), "needs --lr-milestones"),
    (dict(ema_decay=1.0), r"--ema-decay must be in \[0, 1\)"),
    (dict(display_every=0), "--display-every must be positive"),
    (dict(compression_ratio=0), r"--compression-ratio must be in \(0, 1\]"),
    (dict(grad_compression="threshold"), "needs --compression-threshold T > 0"),
    (dict(partial_update=True, grad_compression="fp16"), "cannot be combined with --grad-compression fp16"),
    (dict(grad_compression="powersgd", overlap=False), "--grad-compression powersgd is a DDP hook: it needs --overlap"),
    (dict(grad_compression="topk", overlap=False), "--grad-compression topk is a DDP hook: it needs --overlap"),
    (dict(role="worker", worker_index=1), "--role belongs to --strategy async-ps"),
    (dict(ps_token="s3cret"), "--ps-token belongs to --strategy async-ps"),
    (dict(strategy="async-ps", ps_hosts="a:1", ps_count=1), "not both"),
    (dict(strategy="async-ps", role="ps", ps_hosts="a:1", worker_count=1), "--role ps needs --ps-index"),
    (dict(strategy="async-ps", role="chief", ps_hosts="a:1,a:1", worker_count=1), "an address twice"),
])
def test_each_section_refuses_its_own_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        build_config(**options)


@pytest.mark.parametrize("options, message", [
    (dict(partial_update=True, ema_decay=0.99), "--partial-update with --ema-decay"),
    (dict(partial_update=True, lookahead=5), "--partial-update with --ema-decay or --lookahead"),
    (dict(grad_compression="topk", precision="fp16"), "use --precision fp32 or bf16"),
    (dict(sync_bn=True, device="cpu"), "--sync-bn needs CUDA"),
    (dict(strategy="async-ps", ps_count=1, worker_count=1, ema_decay=0.9), "--ema-decay is not supported"),
    (dict(strategy="async-ps", ps_count=1, worker_count=1, sync_bn=True), "--sync-bn is not supported"),
])
def test_rules_across_sections_are_checked_by_the_whole_config(options, message):
    with pytest.raises(ConfigError, match=message):
        build_config(**options)


def test_a_section_checks_itself_when_built_and_the_whole_checks_what_joins_them():
    with pytest.raises(ConfigError, match="--lr must be positive"):
        OptimConfig(lr=0)
    with pytest.raises(ConfigError, match="--loss-scale applies to --precision fp16"):
        ComputeConfig(loss_scale=128, precision="bf16")
    with pytest.raises(ConfigError, match="--optimizer 'nesterof' is not one of"):
        OptimConfig(optimizer="nesterof")
    sync, optim = SyncConfig(partial_update=True), OptimConfig(ema_decay=0.99)  # each fine on its own
    with pytest.raises(ConfigError, match="--partial-update with --ema-decay"):
        TrainConfig(sync=sync, optim=optim)


def test_options_read_flat_or_through_their_section():
    cfg = build_config(model="resnet56", precision="bf16", lr=0.3, workers=2)
    assert (cfg.model, cfg.precision, cfg.lr, cfg.workers) == ("resnet56", "bf16", 0.3, 2)
    assert (cfg.net.model, cfg.compute.precision, cfg.optim.lr, cfg.data.workers) == ("resnet56", "bf16", 0.3, 2)
    with pytest.raises(AttributeError, match="did you mean 'batch_size'"):
        cfg.bach_size  # noqa: B018
    assert not hasattr(cfg, "__deepcopy__")
    names = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names)) == len(OPTIONS) == len(config_field_names())


def test_a_built_config_cannot_be_changed():
    cfg = build_config(lr_milestones=[100, 150], lr_schedule="multistep", model_kwargs={"width": 2})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim = OptimConfig()
    with pytest.raises(TypeError, match="cfg.replace"):
        cfg.model_kwargs["width"] = 4
    assert cfg.lr_milestones == (100.0, 150.0) and dict(cfg.model_kwargs) == {"width": 2}
    assert pickle.loads(pickle.dumps(cfg)) == cfg and copy.deepcopy(cfg) == cfg


def test_replace_builds_a_new_config_and_checks_it_again():
    cfg = build_config(seed=1, dataset="mnist")
    other = cfg.replace(seed=5, device="gpu")
    assert (other.seed, other.device, other.batch_size) == (5, "cuda", 32)
    assert cfg.seed == 1 and cfg.device == "auto"
    with pytest.raises(ConfigError, match="--lr must be positive"):
        cfg.replace(lr=0)
    with pytest.raises(ConfigError, match="--loss-scale applies to --precision fp16"):
        build_config(precision="fp16", loss_scale=128).replace(precision="bf16")
    with pytest.raises(ConfigError, match="did you mean 'seed'"):
        cfg.replace(sead=2)


def test_to_dict_is_flat_and_reads_back_the_same_config(tmp_path):
    cfg = build_config(dataset="synthetic", synthetic_shape=[1, 28, 28], model="lenet", lr_schedule="multistep",
                       lr_milestones=[2, 5], model_kwargs={"width": 2}, device="cudnn", overwrite=True,
                       max_image_pixels=1000, strategy="async-ps", ps_count=2, worker_count=3)
    data = cfg.to_dict()
    assert set(data) == set(OPTIONS) - {"ps_token"}
    assert data["synthetic_shape"] == [1, 28, 28] and data["device"] == "cuda" and data["model"] == "lenet"
    assert type(data["model_kwargs"]) is dict
    assert config_from_dict(data) == cfg
    assert config_from_dict({**data, "option_of_a_later_version": 1}) == cfg
    old = {k: v for k, v in data.items() if k not in ("overwrite", "max_image_pixels")}  # before they existed
    assert config_from_dict(old).max_image_pixels == 178956970
    save_config(cfg, tmp_path / "config.yaml")
    assert build_config(str(tmp_path / "config.yaml")) == cfg


def test_the_ps_token_is_never_written(tmp_path):
    token = "s3cret-7f1c2a"
    cfg = build_config(strategy="async-ps", ps_count=1, worker_count=1, ps_token=token)
    assert cfg.ps_token == token and cfg.replace(seed=2).ps_token == token
    assert "ps_token" not in cfg.to_dict() and token not in repr(cfg)
    save_config(cfg, tmp_path / "config.yaml")
    assert token not in (tmp_path / "config.yaml").read_text()
    assert config_from_dict(cfg.to_dict()).ps_token == ""


def test_async_ps_reads_workers_as_the_training_processes_unless_they_are_given_otherwise():
    cfg = build_config(strategy="async-ps", ps_count=2, workers=3)  # cifar-tf: --ps 2 --workers 3
    assert (cfg.worker_count, cfg.workers) == (3, -1)
    assert config_from_dict(cfg.to_dict()) == cfg
    cfg = build_config(strategy="async-ps", ps_count=2, worker_count=3, workers=4)
    assert (cfg.worker_count, cfg.workers) == (3, 4)
    cfg = build_config(strategy="async-ps", role="chief", ps_hosts="a:1", worker_hosts="a,b", workers=4)
    assert (cfg.worker_count, cfg.workers) == (0, 4)
    assert build_config(workers=4).workers == 4  # synchronous training: DataLoader processes


def test_a_recipe_may_nest_options_under_their_section(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("net: {model: resnet56}\noptim:\n  lr: 0.2\n  batch-size: 64\nseed: 3\n")
    cfg = build_config(str(recipe))
    assert (cfg.model, cfg.lr, cfg.batch_size, cfg.seed) == ("resnet56", 0.2, 64, 3)
    recipe.write_text("optim: {seed: 3}\n")
    with pytest.raises(ConfigError, match="section 'optim' has no option 'seed' \\(it is in section 'run'\\)"):
        build_config(str(recipe))


def test_every_option_has_help_text():
    missing = [name for name, f in OPTIONS.items() if len(f.metadata["help"].strip()) < 10]
    assert not missing
