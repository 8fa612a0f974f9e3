"""Every schedule of the original reports, read epoch by epoch."""
from __future__ import annotations

import copy

import pytest
import torch

from cellkit.config import TrainConfig
from cellkit.engine.schedule import EarlyStopper, Schedule, build_optimizer, load_optimizer_state, lr_trajectory


def approx(xs: list[float]) -> object:
    return pytest.approx(xs, rel=1e-9, abs=1e-15)


def test_constant_is_constant() -> None:
    assert lr_trajectory(TrainConfig(epochs=5, lr=0.005, scheduler="constant")) == approx([0.005] * 5)


def test_warmup_epochs_at_a_fraction_then_base() -> None:
    # report 000: the first 3 epochs use 10 % of the lr
    cfg = TrainConfig(epochs=6, lr=1e-3, scheduler="constant", warmup_epochs=3, warmup_factor=0.1)
    assert lr_trajectory(cfg) == approx([1e-4, 1e-4, 1e-4, 1e-3, 1e-3, 1e-3])


def test_multistep_at_fractions_of_total_epochs() -> None:
    # report 004: decay at 80 % and 90 % of 100 epochs
    cfg = TrainConfig(epochs=100, lr=0.005, optimizer="sgd", scheduler="multistep", milestones=(0.8, 0.9), gamma=0.1)
    lrs = lr_trajectory(cfg)
    assert lrs[:80] == approx([0.005] * 80)
    assert lrs[80:90] == approx([0.0005] * 10)
    assert lrs[90:] == approx([0.00005] * 10)


def test_multistep_with_warmup_keeps_absolute_milestones() -> None:
    cfg = TrainConfig(epochs=10, lr=1.0, scheduler="multistep", milestones=(0.5, 0.8), warmup_epochs=2, warmup_factor=0.1)
    assert lr_trajectory(cfg) == approx([0.1, 0.1, 1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01])


def test_cosine_reaches_min_lr() -> None:
    cfg = TrainConfig(epochs=5, lr=1.0, scheduler="cosine", min_lr=0.0)
    lrs = lr_trajectory(cfg)
    import math

    assert lrs == approx([0.5 * (1 + math.cos(math.pi * e / 5)) for e in range(5)])


def test_iteration_warmup_rises_linearly() -> None:
    cfg = TrainConfig(epochs=1, lr=1.0, warmup_iters=4, warmup_factor=0.2)
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
    s = Schedule(opt, cfg)
    seen = []
    for _ in range(6):
        seen.append(s.lr)
        opt.step()
        s.step_iter()
    assert seen == approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])


def test_plateau_decays_hold_and_early_stop_after_k_decays() -> None:
    # report 000: warm-up 3 epochs at 10 %, ReduceLROnPlateau(factor 0.2) on val AP50,
    # stop after 3 decays without improvement (patience 1 here to keep the example short)
    cfg = TrainConfig(epochs=30, lr=1.0, scheduler="plateau", plateau_factor=0.2, plateau_patience=1,
                      warmup_epochs=3, warmup_factor=0.1, early_stop_decays=3)
    ap = [0.1, 0.2, 0.3,  # warm-up epochs
          0.4, 0.4, 0.4,  # epoch 5: second epoch without improvement -> decay 1
          0.5,            # new best: decays without improvement reset
          0.5, 0.5,       # decay 2 (first since the best)
          0.5, 0.5,       # decay 3
          0.5, 0.5,       # decay 4 = third since best -> stop
          0.9, 0.9]
    lrs = lr_trajectory(cfg, ap)
    expected = [0.1, 0.1, 0.1,  # warm-up
                1, 1, 1,        # lr during epochs 3..5 (decay happens after epoch 5)
                0.2, 0.2, 0.2,  # the decay holds (the original code reset it)
                0.04, 0.04,
                0.008, 0.008]
    assert lrs == approx(expected)
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
    s = Schedule(opt, cfg)
    stopper = EarlyStopper(cfg)
    opt.step()
    stops = [stopper.update(m, s.step_epoch(m)) is not None for m in ap[:13]]
    assert stops.index(True) == 12 and "3 learning-rate decays" in stopper.stop_reason
    assert s.decays == 4


def test_early_stop_patience() -> None:
    cfg = TrainConfig(epochs=20, lr=1.0, scheduler="constant", early_stop_patience=3)
    assert len(lr_trajectory(cfg, [0.1, 0.2, 0.2, 0.1, 0.15] + [0.9] * 15)) == 5


def test_state_dict_round_trip_continues_the_same_trajectory() -> None:
    cfg = TrainConfig(epochs=12, lr=1.0, scheduler="plateau", plateau_patience=1, warmup_epochs=2, warmup_factor=0.5,
                      warmup_iters=3)
    ap = [0.1, 0.2, 0.3, 0.3, 0.3, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4]
    full = lr_trajectory(cfg, ap, iters_per_epoch=2)

    def run(start: int, stop: int, state: dict | None) -> tuple[list[float], dict, dict]:
        p = torch.nn.Parameter(torch.zeros(1))
        opt = build_optimizer([p], cfg)
        s = Schedule(opt, cfg)
        if state:
            opt.load_state_dict(state["opt"])
            s.load_state_dict(state["sched"])
        out = []
        for e in range(start, stop):
            out.append(s.lr)
            for _ in range(2):
                opt.step()
                s.step_iter()
            s.step_epoch(ap[e])
        return out, {"opt": opt.state_dict(), "sched": s.state_dict()}, {}

    a, state, _ = run(0, 5, None)
    b, _, _ = run(5, 12, state)
    assert a + b == approx(full)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_the_fused_step_on_cpu_survives_a_resume_from_a_per_tensor_checkpoint(optimizer: str) -> None:
    """Parameters on the CPU get the fused step; torch's load_state_dict takes ``fused`` from the
    saved groups, so a checkpoint of the per-tensor step (cellkit before the fused one) turned it
    off on resume. The resumed step continues the per-tensor one to float32 rounding."""
    cfg = TrainConfig(lr=1e-2, optimizer=optimizer, weight_decay=1e-4)
    torch.manual_seed(0)
    start = [torch.randn(50, 3), torch.randn(7)]
    old_params = [torch.nn.Parameter(t.clone()) for t in start]
    old = torch.optim.AdamW(old_params, lr=cfg.lr, weight_decay=cfg.weight_decay) if optimizer == "adamw" else \
        torch.optim.SGD(old_params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    grads = [[torch.randn_like(t) for t in start] for _ in range(4)]
    for g in grads[:2]:
        for p, gp in zip(old_params, g):
            p.grad = gp.clone()
        old.step()
    new_params = [torch.nn.Parameter(p.detach().clone()) for p in old_params]
    new = build_optimizer(new_params, cfg)
    assert new.param_groups[0]["fused"] is True
    load_optimizer_state(new, copy.deepcopy(old.state_dict()))  # as from a checkpoint: no tensor shared
    assert new.param_groups[0]["fused"] is True and new.param_groups[0]["lr"] == cfg.lr
    for g in grads[2:]:
        for params in (old_params, new_params):
            for p, gp in zip(params, g):
                p.grad = gp.clone()
        old.step()
        new.step()
    for a, b, s in zip(old_params, new_params, start):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(a.detach(), s)  # the steps moved it


def test_parameters_off_the_fused_devices_keep_the_per_tensor_step() -> None:
    params = [torch.nn.Parameter(torch.zeros(3, device="meta"))]
    assert build_optimizer(params, TrainConfig()).param_groups[0]["fused"] is None
