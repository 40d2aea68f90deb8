"""Fine-tuning: --init-from (head replacement, the table), --freeze (frozen tensors and BatchNorm
statistics unchanged), --unfreeze-at, --layer-decay / --head-lr-mult groups, and an exact resume."""

from __future__ import annotations

import pytest
import torch

import cnntrain
from cnntrain.config import build_config
from cnntrain.engine.finetune import TABLE_FILE, layer_units, lr_scales
from cnntrain.engine.optim import model_param_groups, set_lr
from cnntrain.errors import ConfigError
from cnntrain.models import create_model
from tests.helpers import cli_args, metrics_rows, same_weights, tiny, weights
from tests.test_engine import train_until_crash

# resnet20 has BatchNorm, a stem, three stages and a head: enough to see every rule act.
BN_NET = dict(model="resnet20", synthetic_shape=[3, 16, 16], synthetic_classes=4)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A trained 4-class resnet20 run to start from."""
    return cnntrain.train(tiny(tmp_path_factory.mktemp("source") / "run", epochs=1, **BN_NET)).run_dir


class AtStart(cnntrain.Callback):
    """Keeps a copy of the weights the run starts from."""

    def on_train_start(self, loop) -> None:
        self.weights = {k: v.clone() for k, v in loop.state.model.state_dict().items()}


def _backbone(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def test_init_from_a_run_loads_matching_tensors_and_a_new_head_for_other_classes(source, tmp_path):
    start = AtStart()
    run = cnntrain.train(tiny(tmp_path / "b", init_from=str(source), max_steps=1, **{**BN_NET, "synthetic_classes": 6}),
                         callbacks=[start]).run_dir
    before = weights(source)
    assert start.weights["fc.weight"].shape[0] == 6
    assert all(torch.equal(before[k], start.weights[k]) for k in _backbone(before))
    table = (run / TABLE_FILE).read_text()
    assert f"from {source / 'model.safetensors'}" in table
    assert "re-initialised   fc.weight (shape [4, 64] in the file, [6, 64] here)" in table
    assert "unused           fc.bias (shape [4])" in table
    assert "loaded           conv.weight" in table


def test_init_from_checkpoints_and_plain_state_dicts_with_wrapper_prefixes(source, tmp_path):
    from cnntrain.engine.finetune import read_state
    from cnntrain.models.pretrained import load_matching

    checkpoint = sorted((source / "checkpoints").glob("step-*.pt"))[-1]
    state, where = read_state(str(checkpoint))
    assert where == str(checkpoint) and "conv.weight" in state
    plain = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights(source).items()}}, plain)
    model = create_model("resnet20", num_classes=4)
    table = load_matching(model, *read_state(str(plain)))
    assert not table.reinitialised and torch.equal(model.state_dict()["fc.weight"], weights(source)["fc.weight"])


def test_nothing_matching_is_an_error(source, tmp_path):
    with pytest.raises(ConfigError, match="no tensor matches model LeNet"):
        cnntrain.train(tiny(tmp_path / "b", init_from=str(source), max_steps=1))
    with pytest.raises(ConfigError, match="no such file"):
        cnntrain.train(tiny(tmp_path / "c", init_from=str(tmp_path / "missing.pt"), max_steps=1))


def test_frozen_backbone_and_its_batchnorm_statistics_stay_bit_identical(source, tmp_path):
    run = cnntrain.train(tiny(tmp_path / "b", init_from=str(source), freeze="backbone", epochs=1, **BN_NET)).run_dir
    before, after = weights(source), weights(run)
    frozen = _backbone(before)
    assert any("running_mean" in k for k in frozen)
    assert all(torch.equal(before[k], after[k]) for k in frozen), [k for k in frozen
                                                                   if not torch.equal(before[k], after[k])]
    assert not torch.equal(before["fc.weight"], after["fc.weight"])


def test_freeze_by_prefix_and_unfreeze_at_lets_everything_train(source, tmp_path):
    run = cnntrain.train(tiny(tmp_path / "b", init_from=str(source), freeze="conv,bn,blocks.0", unfreeze_at=1,
                              epochs=2, **BN_NET)).run_dir
    before, after = weights(source), weights(run)
    assert not torch.equal(before["conv.weight"], after["conv.weight"])  # trained in epoch 2
    assert not torch.equal(before["bn.running_mean"], after["bn.running_mean"])
    once = cnntrain.train(tiny(tmp_path / "c", init_from=str(source), freeze="conv,bn,blocks.0", epochs=1,
                               **BN_NET)).run_dir
    first = weights(once)
    assert torch.equal(before["blocks.0.conv1.weight"], first["blocks.0.conv1.weight"])
    assert torch.equal(before["bn.running_var"], first["bn.running_var"])
    assert not torch.equal(before["blocks.1.conv1.weight"], first["blocks.1.conv1.weight"])
    with pytest.raises(ConfigError, match="--freeze 'layer9' names no parameters.*blocks, bn, conv, fc"):
        cnntrain.train(tiny(tmp_path / "d", freeze="layer9", max_steps=1, **BN_NET))


def test_layer_decay_and_head_lr_mult_scale_each_layer_from_the_head_down():
    model = create_model("resnet20", num_classes=4)
    units = layer_units(model)
    assert units[1] == ["conv", "bn"] and units[-1] == ["fc"] and units[2] == ["blocks.0"]
    scales = lr_scales(model, 0.5, 10.0)
    top = len(units) - 1
    assert scales["fc.weight"] == 10.0 and scales["blocks.8.conv2.weight"] == 0.5
    assert scales["blocks.7.bn1.bias"] == 0.25 and scales["conv.weight"] == scales["bn.bias"] == 0.5 ** (top - 1)
    cfg = build_config(model="resnet20", layer_decay=0.5, head_lr_mult=10.0)
    groups = model_param_groups(model, cfg)
    optimizer = torch.optim.SGD(groups, lr=0.1)
    set_lr(optimizer, 0.1)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["fc.weight"])] == pytest.approx(1.0)
    assert lr_of[id(named["conv.weight"])] == pytest.approx(0.1 * 0.5 ** (top - 1))
    assert sum(len(g["params"]) for g in groups) == len(named)  # every parameter once
    plain = model_param_groups(model, build_config(model="resnet20"))
    assert all("lr_scale" not in g for g in plain)  # off by default: the groups as before



def test_a_resumed_fine_tune_equals_an_uninterrupted_one(source, tmp_path):
    options = dict(init_from=str(source), freeze="backbone", unfreeze_at=1, layer_decay=0.7, head_lr_mult=3.0,
                   epochs=2, save_every=3, **BN_NET)
    full = cnntrain.train(tiny(tmp_path / "full", **options))
    for crash_at in (3, 9):  # frozen still, and after the unfreeze at step 8
        part = tiny(tmp_path / f"part{crash_at}", **options)
        train_until_crash(part, crash_at)
        resumed = cnntrain.train({**part, "resume": "auto"})
        assert same_weights(full.run_dir, resumed.run_dir), crash_at
        assert metrics_rows(full.run_dir) == metrics_rows(resumed.run_dir)


def test_options_are_checked_and_refused_where_they_cannot_work(tmp_path):
    with pytest.raises(ConfigError, match="--unfreeze-at 2.0 needs --freeze"):
        build_config(unfreeze_at=2)
    with pytest.raises(ConfigError, match="--pretrained and --init-from"):
        build_config(pretrained="DEFAULT", init_from="x")
    with pytest.raises(ConfigError, match="--layer-decay must be in"):
        build_config(layer_decay=1.5)
    with pytest.raises(ConfigError, match="--freeze is not supported with --strategy async-ps"):
        build_config(strategy="async-ps", freeze="backbone")
    with pytest.raises(ConfigError, match="--pretrained is not supported with --strategy async-ps"):
        build_config(strategy="async-ps", pretrained="DEFAULT")


def test_cli_pretrained_flag_alone_means_default_and_its_errors_are_one_line(tmp_path, capsys):
    from cnntrain.cli import build_parser, main

    args = build_parser().parse_args(["train", "--pretrained", "--model", "resnet18"])
    assert args.pretrained == "DEFAULT"
    assert main(["train", *cli_args(tiny(tmp_path / "r", model="resnet18", pretrained="IMAGENET1K_V9"))]) != 0
    err = capsys.readouterr().err
    assert "cnntrain: error: --pretrained 'IMAGENET1K_V9': resnet18 has weights DEFAULT, IMAGENET1K_V1" in err
