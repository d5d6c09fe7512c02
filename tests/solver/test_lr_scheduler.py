import logging
import math

import pytest
import torch
from fvcore.common.param_scheduler import CosineParamScheduler, MultiStepParamScheduler

from trainkit.config import get_cfg
from trainkit.solver import (
    LRMultiplier,
    StepWithFixedGammaParamScheduler,
    WarmupParamScheduler,
    build_lr_scheduler,
)

BASE_LR = 0.1
MAX_ITER = 20


def make_cfg(*opts):
    cfg = get_cfg()
    cfg.merge_from_list(["SOLVER.BASE_LR", BASE_LR, "SOLVER.MAX_ITER", MAX_ITER, "SOLVER.WARMUP_ITERS", 0, *opts])
    return cfg


def make_optimizer(lr=BASE_LR):
    return torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=lr, momentum=0.0)


def run(optimizer, scheduler, num_iters):
    """The LR each of num_iters iterations trains with."""
    lrs = []
    for _ in range(num_iters):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def lr_curve(cfg, num_iters=MAX_ITER + 5):
    """The LR curve of cfg's schedule, stepping past MAX_ITER to check the end."""
    optimizer = make_optimizer(cfg.SOLVER.BASE_LR)
    return run(optimizer, build_lr_scheduler(cfg, optimizer), num_iters)


def assert_curve(actual, expected):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a == pytest.approx(e, rel=1e-12, abs=1e-15), f"iteration {i}: {a} != {e}"


def cosine(where, end_factor):
    return end_factor + 0.5 * (1 - end_factor) * (1 + math.cos(math.pi * where))


def test_multistep_with_linear_warmup_matches_closed_form():
    cfg = make_cfg("SOLVER.STEPS", "(8, 14)", "SOLVER.GAMMA", 0.1, "SOLVER.WARMUP_ITERS", 5,
                   "SOLVER.WARMUP_FACTOR", 0.01)
    expected = []
    for t in range(MAX_ITER + 5):
        if t < 5:
            alpha = t / 5
            expected.append(BASE_LR * (0.01 * (1 - alpha) + alpha))
        else:
            expected.append(BASE_LR * 0.1 ** sum(t >= s for s in (8, 14)))
    assert_curve(lr_curve(cfg), expected)
    assert expected[-1] == pytest.approx(BASE_LR * 0.01)  # past MAX_ITER: the final value


def test_constant_warmup_matches_closed_form():
    cfg = make_cfg("SOLVER.STEPS", "(10,)", "SOLVER.GAMMA", 0.5, "SOLVER.WARMUP_ITERS", 4,
                   "SOLVER.WARMUP_FACTOR", 0.25, "SOLVER.WARMUP_METHOD", "constant")
    expected = [BASE_LR * (0.25 if t < 4 else 1.0 if t < 10 else 0.5) for t in range(MAX_ITER + 5)]
    assert_curve(lr_curve(cfg), expected)


def test_cosine_with_end_lr_and_warmup_matches_closed_form():
    end_lr = 0.004
    cfg = make_cfg("SOLVER.LR_SCHEDULER_NAME", "WarmupCosineLR", "SOLVER.BASE_LR_END", end_lr,
                   "SOLVER.WARMUP_ITERS", 4, "SOLVER.WARMUP_FACTOR", 0.1)
    e = end_lr / BASE_LR
    warmup_end = cosine(4 / MAX_ITER, e)
    expected = []
    for t in range(MAX_ITER + 5):
        if t < 4:
            expected.append(BASE_LR * (0.1 * (1 - t / 4) + warmup_end * t / 4))
        else:
            expected.append(BASE_LR * cosine(min(t, MAX_ITER) / MAX_ITER, e))
    lrs = lr_curve(cfg)
    assert_curve(lrs, expected)
    assert lrs[MAX_ITER:] == pytest.approx([end_lr] * 5, rel=1e-12)  # reaches BASE_LR_END and stays there


def test_cosine_without_warmup_starts_at_base_lr():
    cfg = make_cfg("SOLVER.LR_SCHEDULER_NAME", "WarmupCosineLR", "SOLVER.BASE_LR_END", 0.0)
    expected = [BASE_LR * cosine(min(t, MAX_ITER) / MAX_ITER, 0.0) for t in range(MAX_ITER + 5)]
    lrs = lr_curve(cfg)
    assert lrs[0] == BASE_LR
    assert_curve(lrs, expected)


@pytest.mark.parametrize("max_iter, num_decays", [(20, 3), (10, 2)])
def test_step_with_fixed_gamma_matches_closed_form(max_iter, num_decays):
    cfg = make_cfg("SOLVER.LR_SCHEDULER_NAME", "WarmupStepWithFixedGammaLR", "SOLVER.MAX_ITER", max_iter,
                   "SOLVER.NUM_DECAYS", num_decays, "SOLVER.GAMMA", 0.5)
    # Training is cut into num_decays + 1 equal parts; part k trains with gamma**k. Past the end: the last part.
    parts = num_decays + 1
    expected = [BASE_LR * 0.5 ** min(t * parts // max_iter, num_decays) for t in range(max_iter + 5)]
    assert_curve(lr_curve(cfg, max_iter + 5), expected)


def test_fixed_gamma_scheduler_is_defined_at_the_end_of_training():
    sched = StepWithFixedGammaParamScheduler(base_value=1.0, num_decays=2, gamma=0.1, num_updates=3_000_000)
    assert sched(1.0) == pytest.approx(0.01)
    assert sched(1 - 1 / 3_000_000) == pytest.approx(0.01)
    assert sched(0.5) == pytest.approx(0.1)


def test_rescale_interval_moves_the_steps_after_the_warmup():
    cfg = make_cfg("SOLVER.STEPS", "(10,)", "SOLVER.GAMMA", 0.1, "SOLVER.WARMUP_ITERS", 5,
                   "SOLVER.WARMUP_FACTOR", 0.2, "SOLVER.RESCALE_INTERVAL", True)
    # The multi-step schedule runs on iterations [5, 20) squeezed to [0, 20): its step at 10 lands at 12.5 -> 13.
    expected = [BASE_LR * (0.2 * (1 - t / 5) + t / 5) for t in range(5)]
    expected += [BASE_LR * (1.0 if t < 13 else 0.1) for t in range(5, MAX_ITER + 5)]
    assert_curve(lr_curve(cfg), expected)


def test_rescale_interval_cosine_starts_after_the_warmup():
    cfg = make_cfg("SOLVER.LR_SCHEDULER_NAME", "WarmupCosineLR", "SOLVER.WARMUP_ITERS", 4,
                   "SOLVER.WARMUP_FACTOR", 0.5, "SOLVER.RESCALE_INTERVAL", True)
    expected = [BASE_LR * (0.5 * (1 - t / 4) + t / 4) for t in range(4)]
    expected += [BASE_LR * cosine(min((t - 4) / (MAX_ITER - 4), 1.0), 0.0) for t in range(4, MAX_ITER + 5)]
    assert_curve(lr_curve(cfg), expected)


def test_steps_at_or_past_max_iter_are_dropped_with_a_warning(caplog):
    cfg = make_cfg("SOLVER.STEPS", "(10, 20, 30)", "SOLVER.GAMMA", 0.1)
    with caplog.at_level(logging.WARNING, logger="trainkit.solver.build"):
        lrs = lr_curve(cfg)
    assert [r.getMessage() for r in caplog.records] == [
        "SOLVER.STEPS (20, 30) are at or past SOLVER.MAX_ITER=20 and are ignored; the LR schedule has steps (10,)"
    ]
    assert_curve(lrs, [BASE_LR * (1.0 if t < 10 else 0.1) for t in range(MAX_ITER + 5)])


def test_warmup_longer_than_training_warms_up_the_whole_run():
    # The default WARMUP_ITERS (1000) with a 20-iteration smoke run.
    for rescale in (False, True):
        cfg = make_cfg("SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", 1000, "SOLVER.WARMUP_FACTOR", 0.001,
                       "SOLVER.RESCALE_INTERVAL", rescale)
        expected = [BASE_LR * (0.001 * (1 - t / MAX_ITER) + t / MAX_ITER) for t in range(MAX_ITER)]
        expected += [BASE_LR] * 5
        assert_curve(lr_curve(cfg), expected)


def test_bad_scheduler_settings_are_clear_errors():
    optimizer = make_optimizer()
    with pytest.raises(ValueError, match=r"Unknown SOLVER.LR_SCHEDULER_NAME 'WarmupPolyLR'; valid ones: "
                                         r"WarmupMultiStepLR, WarmupCosineLR, WarmupStepWithFixedGammaLR"):
        build_lr_scheduler(make_cfg("SOLVER.LR_SCHEDULER_NAME", "WarmupPolyLR"), optimizer)
    with pytest.raises(ValueError, match=r"SOLVER.STEPS must be positive iterations in increasing order, got \(8, 4\)"):
        build_lr_scheduler(make_cfg("SOLVER.STEPS", "(8, 4)"), optimizer)
    with pytest.raises(ValueError, match="Unknown warmup_method 'cosine'; use 'linear' or 'constant'"):
        build_lr_scheduler(make_cfg("SOLVER.WARMUP_METHOD", "cosine"), optimizer)
    with pytest.raises(ValueError, match="SOLVER.MAX_ITER must be a positive number of iterations, got 0"):
        build_lr_scheduler(make_cfg("SOLVER.MAX_ITER", 0), optimizer)
    with pytest.raises(ValueError, match=r"warmup_length is a fraction of training in \[0, 1\], got 1.5"):
        WarmupParamScheduler(CosineParamScheduler(1, 0), 0.1, 1.5)


def test_lr_multiplier_scales_each_group_base_lr():
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD([{"params": [model.weight], "lr": 1.0}, {"params": [model.bias], "lr": 0.5}])
    sched = LRMultiplier(optimizer, MultiStepParamScheduler([1.0, 0.1], num_updates=4, milestones=[2]), max_iter=4)
    lrs = []
    for _ in range(6):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        sched.step()
    assert lrs == [[1.0, 0.5], [1.0, 0.5], [0.1, 0.05], [0.1, 0.05], [0.1, 0.05], [0.1, 0.05]]
    assert sched.get_last_lr() == [0.1, 0.05]


@pytest.mark.parametrize("name", ["WarmupMultiStepLR", "WarmupCosineLR", "WarmupStepWithFixedGammaLR"])
def test_state_dict_round_trip_through_weights_only_load_gives_the_same_lrs(tmp_path, name):
    cfg = make_cfg("SOLVER.LR_SCHEDULER_NAME", name, "SOLVER.STEPS", "(12,)", "SOLVER.WARMUP_ITERS", 6)
    optimizer = make_optimizer()
    scheduler = build_lr_scheduler(cfg, optimizer)
    run(optimizer, scheduler, 9)
    state = scheduler.state_dict()
    assert state == {"base_lrs": [BASE_LR], "last_epoch": 9}
    path = tmp_path / "scheduler.pth"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)

    resumed_optimizer = make_optimizer()
    resumed = build_lr_scheduler(cfg, resumed_optimizer)
    resumed.load_state_dict(loaded)
    assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert resumed.get_last_lr() == scheduler.get_last_lr()
    assert run(resumed_optimizer, resumed, 15) == run(optimizer, scheduler, 15)


def test_load_state_dict_with_other_number_of_groups_is_a_clear_error():
    scheduler = build_lr_scheduler(make_cfg(), make_optimizer())
    with pytest.raises(ValueError, match="has 2 base LRs but the optimizer has 1 parameter groups"):
        scheduler.load_state_dict({"base_lrs": [0.1, 0.2], "last_epoch": 3})
