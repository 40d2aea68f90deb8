import math

import pytest
import torch

from cnntrain.config import build_config
from cnntrain.engine.larc import apply_larc
from cnntrain.engine.optim import build_optimizer, lr_at, param_groups, set_lr
from cnntrain.engine.precision import LossScaler


def _lr(schedule, step, total=100, spe=10, **kw):
    cfg = build_config(lr_schedule=schedule, **kw)
    return lr_at(step, cfg, 1.0, spe, total)


def test_warmup_is_linear_then_schedule_starts_at_peak():
    assert _lr("cosine", 0, warmup_epochs=1) == pytest.approx(0.1)
    assert _lr("cosine", 9, warmup_epochs=1) == pytest.approx(1.0)
    assert _lr("cosine", 10, warmup_epochs=1) == pytest.approx(1.0)


def test_schedules():
    assert _lr("constant", 77) == 1.0
    assert _lr("cosine", 50) == pytest.approx(0.5)
    assert _lr("cosine", 100) == pytest.approx(0.0)
    assert _lr("poly", 50) == pytest.approx(0.25)  # (1 - 0.5)^2, nvcnn's power 2
    assert _lr("step", 35, lr_step_epochs=3) == pytest.approx(0.1)
    assert _lr("multistep", 55, lr_milestones=[2, 5]) == pytest.approx(0.01)
    assert _lr("onecycle", 0) == pytest.approx(0.04)
    assert _lr("onecycle", 25) == pytest.approx(1.0)
    assert _lr("onecycle", 100) == pytest.approx(0.0)


def test_no_decay_group_for_bn_and_bias():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    groups = param_groups(model, 5e-4, decay_bn_bias=False)
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert groups[1]["weight_decay"] == 0.0


def test_norm_lr_scale_speeds_up_batchnorm_only_and_keeps_its_decay_per_step():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    cfg = build_config(None, lr=0.5, weight_decay=1e-3, decay_bn_bias=True, norm_lr_scale=64)
    optimizer = build_optimizer(model, cfg, "cpu")
    set_lr(optimizer, 0.5)
    norm = [g for g in optimizer.param_groups if g.get("lr_scale")]
    assert len(norm) == 1 and {id(p) for p in norm[0]["params"]} == {id(p) for p in model[1].parameters()}
    assert norm[0]["lr"] == 32.0
    assert norm[0]["lr"] * norm[0]["weight_decay"] == pytest.approx(0.5 * 1e-3)  # same decay per step
    others = [g for g in optimizer.param_groups if not g.get("lr_scale")]
    assert all(g["lr"] == 0.5 for g in others)  # conv and linear biases keep the schedule's LR


def test_nesterov_option():
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, build_config(optimizer="nesterov"), "cpu")
    assert opt.param_groups[0]["nesterov"] is True


def _larc_case(mode):
    w = torch.nn.Parameter(torch.tensor([[3.0], [4.0]]))  # ||w|| = 5 (2-d: LARC skips 1-d parameters)
    w.grad = torch.tensor([[0.6], [0.8]])  # ||g|| = 1
    opt = torch.optim.SGD([{"params": [w], "weight_decay": 0.0, "larc_exclude": False}], lr=0.1)
    return w, opt


@pytest.mark.parametrize("mode,lr,expected_factor", [
    ("clip", 0.1, min(0.003 * 5 / 1 / 0.1, 1.0)),  # local = 0.015 -> min(0.15, 1)
    ("clip", 0.001, 1.0),  # local / lr = 15 -> clipped to 1
    ("scale", 0.1, 0.003 * 5 / 1),
])
def test_larc_follows_nvcnn_formulas(mode, lr, expected_factor):
    w, opt = _larc_case(mode)
    apply_larc(opt, lr, mode, eta=0.003, eps=0.0)
    assert torch.allclose(w.grad, torch.tensor([[0.6], [0.8]]) * expected_factor)


def test_larc_folds_weight_decay_and_skips_excluded_groups():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))
    b = torch.nn.Parameter(torch.tensor([1.0]))
    w.grad, b.grad = torch.zeros(1, 2), torch.tensor([0.5])
    opt = torch.optim.SGD([{"params": [w], "larc_weight_decay": 0.1, "larc_exclude": False},
                           {"params": [b], "larc_weight_decay": 0.0, "larc_exclude": True}], lr=1.0)
    apply_larc(opt, 1.0, "scale", eta=0.003, eps=0.0)
    g = 0.1 * torch.tensor([[3.0, 4.0]])  # gradient is pure weight decay, ||g|| = 0.5
    assert torch.allclose(w.grad, g * (0.003 * 5 / 0.5))
    assert torch.equal(b.grad, torch.tensor([0.5]))


@pytest.mark.parametrize("mode", ["clip", "scale"])
def test_larc_leaves_a_zero_weight_its_gradient_so_it_moves(mode):
    """nvcnn: factor 1 where ||w|| or ||g|| is 0; factor 0 would keep a zero-initialised weight at 0."""
    w = torch.nn.Parameter(torch.zeros(2, 3))
    w.grad = torch.ones(2, 3)
    opt = torch.optim.SGD([{"params": [w], "larc_weight_decay": 1e-4, "larc_exclude": False}], lr=0.1)
    apply_larc(opt, 0.1, mode, eta=0.003, eps=1e-8)
    assert torch.equal(w.grad, torch.ones(2, 3))
    opt.step()
    assert torch.allclose(w.detach(), torch.full((2, 3), -0.1))
    w.grad = torch.zeros(2, 3)  # and a zero gradient (pure zero decay of a zero weight) stays finite
    apply_larc(opt, 0.1, mode, eta=0.003, eps=0.0)
    assert torch.isfinite(w.grad).all()


def _bn_net():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.LazyLinear(2))


@pytest.mark.parametrize("decay_bn_bias", [True, False])
def test_larc_leaves_biases_and_bn_alone_unless_asked(decay_bn_bias):
    def factors(larc_bn_bias=None):
        net = _bn_net()
        net(torch.randn(2, 3, 8, 8))
        if larc_bn_bias is None:  # as the trainer builds it
            cfg = build_config(None, lr=0.1, larc_mode="scale", weight_decay=0.0, decay_bn_bias=decay_bn_bias)
            opt = build_optimizer(net, cfg, "cpu")
        else:
            opt = torch.optim.SGD(param_groups(net, 0.0, decay_bn_bias, larc_bn_bias=larc_bn_bias), lr=0.1)
        for p in net.parameters():
            p.grad = torch.full_like(p, 0.1)
        apply_larc(opt, 0.1, "scale", eta=0.5, eps=0.0)
        return {name: float(p.grad.flatten()[0] / 0.1) for name, p in net.named_parameters()}

    for default in (factors(), factors(larc_bn_bias=False)):
        assert default["0.bias"] == default["1.weight"] == default["1.bias"] == default["3.bias"] == 1.0
        assert default["0.weight"] != 1.0 and default["3.weight"] != 1.0
    asked = factors(larc_bn_bias=True)
    assert asked["1.weight"] != 1.0 and asked["0.bias"] != 1.0 and asked["0.weight"] != 1.0


def test_larc_bn_bias_option_marks_every_group():
    net = _bn_net()
    net(torch.randn(2, 3, 8, 8))
    plain = param_groups(net, 1e-4, decay_bn_bias=False)
    assert [(g["larc_exclude"], g["larc_1d"]) for g in plain] == [(False, False), (True, False)]
    asked = param_groups(net, 1e-4, decay_bn_bias=False, norm_lr_scale=4, larc_bn_bias=True)
    assert [(g["larc_exclude"], g["larc_1d"]) for g in asked] == [(False, True)] * 3


def test_dynamic_loss_scale_halves_on_overflow_and_grows_after_interval():
    s = LossScaler(1024.0, dynamic=True, growth_interval=3)
    s.update(found_inf=True)
    assert s.scale == 512.0 and s.skipped == 1
    for _ in range(3):
        s.update(found_inf=False)
    assert s.scale == 1024.0


def test_static_loss_scale_never_changes_but_still_skips():
    s = LossScaler.for_precision("fp16", static_scale=128)
    s.update(found_inf=True)
    assert s.scale == 128 and s.skipped == 1
    loss = torch.tensor(2.0)
    assert float(s.scale_loss(loss)) == 256.0
    g = [torch.tensor([256.0])]
    s.unscale_(g)
    assert float(g[0]) == 2.0


def test_fp32_scaler_is_identity():
    s = LossScaler.for_precision("fp32")
    assert s.scale == 1.0 and not s.dynamic
    assert math.isclose(float(s.scale_loss(torch.tensor(3.0))), 3.0)


def test_fastnet_whitening_bias_trains_for_its_first_epochs_only():
    from cnntrain.models import create_model

    net = create_model("fastnet", 10, whiten_bias_epochs=2)
    cfg = build_config(model="fastnet", lr=0.5)
    opt = build_optimizer(net, cfg, "cpu")
    (timed,) = [g for g in opt.param_groups if "until_epoch" in g]
    assert timed["params"] == [net.whiten.bias] and timed["until_epoch"] == 2
    assert all(net.whiten.bias is not p for g in opt.param_groups if g is not timed for p in g["params"])
    x = torch.randn(4, 3, 32, 32)

    def step(epoch):
        before = net.whiten.bias.detach().clone()
        set_lr(opt, 0.5, epoch)
        net(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        return not torch.equal(before, net.whiten.bias)

    assert step(1.9) and timed["lr"] == 0.5
    assert not step(2.0) and timed["lr"] == 0.0  # momentum and decay leave it alone too
    assert not any(g["lr"] == 0 for g in opt.param_groups if g is not timed)


def test_lookahead_pulls_back_by_a_cubic_ramp_and_ends_on_the_slow_weights():
    from cnntrain.engine.lookahead import Lookahead

    net = torch.nn.Linear(1, 1, bias=False)
    net.weight.data.fill_(0.0)
    la = Lookahead(net, every=2, alpha=0.5, total_steps=4)
    net.weight.data.fill_(1.0)
    la.after_step(1)  # not a multiple of 2: nothing happens
    assert net.weight.item() == 1.0
    la.after_step(2)  # pull-back 0.5^2 * (2/4)^3 = 1/32 toward the slow 0
    assert net.weight.item() == pytest.approx(1 - 1 / 32) and la.slow[0].item() == pytest.approx(1 - 1 / 32)
    net.weight.data.fill_(5.0)
    la.after_step(3)
    net.weight.data.fill_(7.0)
    la.after_step(4)  # 0.25 of the way back, then the live weights take the slow ones
    expected = (1 - 1 / 32) * 0.25 + 7.0 * 0.75
    assert net.weight.item() == pytest.approx(expected) and la.slow[0].item() == pytest.approx(expected)
