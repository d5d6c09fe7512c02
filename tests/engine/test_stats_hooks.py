"""hooks.TorchMemoryStats and hooks.PreciseBN (trainkit/engine/stats_hooks.py), alone and in DefaultTrainer.

The BatchNorm statistics are compared with a closed form: the BN layer's inputs computed by hand from the
model's weights for the very batches PreciseBN reads.
"""
import itertools
import resource

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.engine.digits_runs import (
    CONSTANT_LR,
    RecordingAtEvaluation,
    assert_same_weights,
    digits_cfg,
    read_metrics,
    train,
    weights,
)
from trainkit.data import build_train_loader
from trainkit.engine import SimpleTrainer, hooks
from trainkit.modeling import MODEL_REGISTRY


# ---- TorchMemoryStats --------------------------------------------------------------------------------------
class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, batch):
        return {"loss": (self.linear(batch) ** 2).mean()}


def _regression_trainer():
    model = Regression()
    data = (torch.randn(8, 4) for _ in itertools.count())
    return SimpleTrainer(model, data, torch.optim.SGD(model.parameters(), lr=0.01), gather_metric_period=1)


def test_memory_stats_puts_the_peak_rss_on_cpu_at_its_periods_and_after_the_last_iteration():
    trainer = _regression_trainer()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainer.register_hooks([hooks.TorchMemoryStats(period=3)])
    trainer.train(0, 8)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    history = trainer.storage.history("memory/max_rss_mb").values()
    assert [it for _, it in history] == [2, 5, 7]
    values = [v for v, _ in history]
    # The process's peak so far (in MB, Linux reports KB): it never goes down, and lies between the peaks
    # measured around the run.
    assert values == sorted(values)
    assert before <= values[0] and values[-1] <= after
    assert "memory/max_allocated_mb" not in trainer.storage.histories()


def test_memory_stats_stops_after_max_runs():
    trainer = _regression_trainer()
    trainer.register_hooks([hooks.TorchMemoryStats(period=2, max_runs=2)])
    trainer.train(0, 9)
    assert [it for _, it in trainer.storage.history("memory/max_rss_mb").values()] == [1, 3]


@pytest.mark.parametrize("kwargs", [{"period": 0}, {"period": 2.5}, {"max_runs": 0}])
def test_memory_stats_rejects_bad_arguments_naming_them(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"TorchMemoryStats {name}"):
        hooks.TorchMemoryStats(**kwargs)


def test_default_trainer_writes_the_memory_curve_on_every_metrics_line(tmp_path):
    train(digits_cfg(tmp_path))
    metrics = read_metrics(tmp_path)
    assert [m["iteration"] for m in metrics] == [9, 19, 29, 39]
    curve = [m["memory/max_rss_mb"] for m in metrics]
    assert all(v > 0 for v in curve) and curve == sorted(curve)


# ---- PreciseBN ---------------------------------------------------------------------------------------------
class LinearBN(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Dropout -> Linear; the BN input is ``linear(x)``."""

    def __init__(self, in_features=5, width=3):
        super().__init__()
        self.linear = nn.Linear(in_features, width)
        self.bn = nn.BatchNorm1d(width)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.5), nn.Linear(width, 1))

    def bn_input(self, x):
        return F.linear(x, self.linear.weight, self.linear.bias)

    def forward(self, x):
        return self.head(self.bn(self.linear(x))).sum()


class ConvBN(nn.Module):
    """Conv2d -> BatchNorm2d: every spatial position of every sample is one value of a channel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)

    def bn_input(self, x):
        return F.conv2d(x, self.conv.weight, self.conv.bias).transpose(0, 1).flatten(1).T  # (values, channels)

    def forward(self, x):
        return self.bn(self.conv(x)).sum()


def _batches(shape, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * 3 + 1 for _ in range(n)]


@pytest.mark.parametrize("model_cls, shape", [(LinearBN, (16, 5)), (ConvBN, (4, 2, 6, 6))])
def test_precise_bn_sets_the_mean_and_variance_of_the_bn_inputs_over_its_batches(model_cls, shape):
    torch.manual_seed(0)
    model = model_cls().train()
    loader = _batches(shape, 7)
    mean_buffer, var_buffer = model.bn.running_mean, model.bn.running_var
    hooks.PreciseBN(period=1, model=model, data_loader=loader, num_iter=5).update_stats()

    with torch.no_grad():
        features = torch.cat([model.bn_input(x) for x in loader[:5]]).double()  # only the first 5 batches
    # The mean of all values, and their variance about it with divisor N (fvcore's population estimator).
    torch.testing.assert_close(model.bn.running_mean, features.mean(0).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.bn.running_var, features.var(0, unbiased=False).float(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model.bn.running_var, features.var(0, unbiased=True).float(), rtol=1e-5, atol=1e-5)
    # In the layer's own tensors (what holds them, e.g. an EMA or DDP, sees the new values), momentum restored.
    assert model.bn.running_mean is mean_buffer and model.bn.running_var is var_buffer
    assert model.bn.momentum == 0.1


def test_precise_bn_does_not_change_the_global_rng_state():
    model = LinearBN().train()  # has dropout, which draws from the global RNG
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    hooks.PreciseBN(period=1, model=model, data_loader=_batches((8, 5), 3), num_iter=3).update_stats()
    assert torch.equal(torch.rand(4), expected)


class CountingLoader:
    """A finite iterable that counts the batches it gave."""

    def __init__(self, batches):
        self.batches, self.given = batches, 0

    def __iter__(self):
        for b in self.batches:
            self.given += 1
            yield b


def test_precise_bn_is_a_no_op_without_batchnorm_and_never_reads_the_loader():
    model = Regression().train()
    loader = CountingLoader(_batches((8, 4), 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hook = hooks.PreciseBN(period=1, model=model, data_loader=loader, num_iter=3)
    hook.update_stats()
    assert loader.given == 0
    assert_same_weights(model.state_dict(), before)


def test_precise_bn_each_run_reads_a_fresh_iterator_of_its_loader():
    model = LinearBN().train()
    loader = CountingLoader(_batches((8, 5), 4))
    hook = hooks.PreciseBN(period=1, model=model, data_loader=loader, num_iter=3)
    hook.update_stats()
    first = model.bn.running_mean.clone()
    hook.update_stats()  # the same 3 batches again: the same statistics (the weights did not change)
    assert loader.given == 6
    assert torch.equal(model.bn.running_mean, first)


def test_precise_bn_with_too_short_a_loader_is_a_clear_error():
    with pytest.raises(ValueError, match="needs 5 batches but the data loader has 3.*TEST.PRECISE_BN.NUM_ITER"):
        hooks.PreciseBN(period=1, model=LinearBN(), data_loader=_batches((8, 5), 3), num_iter=5)
    hook = hooks.PreciseBN(period=1, model=LinearBN(), data_loader=CountingLoader(_batches((8, 5), 2)), num_iter=4)
    with pytest.raises(ValueError, match="needs 4 batches but the data loader ended after 2"):
        hook.update_stats()


@MODEL_REGISTRY.register()
class DigitsBNClassifierOfTestStatsHooks(nn.Module):
    """A digits classifier with a BatchNorm layer (and dropout after it, so training draws random numbers)."""

    def __init__(self, cfg):
        super().__init__()
        self.linear = nn.Linear(64, 32)
        self.bn = nn.BatchNorm1d(32)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, cfg.MODEL.NUM_CLASSES))

    def forward(self, batch):
        logits = self.head(self.bn(self.linear(batch["image"].flatten(1))))
        if not self.training:
            return {"logits": logits}
        return {"loss_cls": F.cross_entropy(logits, batch["label"])}


BN_MODEL = ["MODEL.META_ARCHITECTURE", "DigitsBNClassifierOfTestStatsHooks", *CONSTANT_LR]
PRECISE_BN = ["TEST.PRECISE_BN.ENABLED", "True", "TEST.PRECISE_BN.NUM_ITER", "4"]


@pytest.mark.parametrize("ema", [False, True])
def test_default_trainer_recomputes_the_bn_statistics_from_a_fresh_train_loader_before_each_evaluation(tmp_path, ema):
    # With an EMA evaluated, the evaluated average carries the statistics recomputed for the raw weights.
    opts = ["MODEL_EMA.ENABLED", str(ema), "MODEL_EMA.DECAY", "0.5"]
    cfg = digits_cfg(tmp_path, *BN_MODEL, *PRECISE_BN, *opts, "SOLVER.MAX_ITER", "20", "TEST.EVAL_PERIOD", "10")
    raw = {}
    record = hooks.CallbackHook(after_step=lambda t: raw.update({t.iter: weights(t)}))
    RecordingAtEvaluation.seen = []
    trainer, _ = train(cfg, RecordingAtEvaluation, extra_hooks=[record])
    kinds = [type(h) for h in trainer._hooks]
    assert kinds.index(hooks.PreciseBN) < kinds.index(hooks.EvalHook)
    assert len(RecordingAtEvaluation.seen) == 2  # after iterations 9 and 19
    first_batches = [b["image"].flatten(1) for b in itertools.islice(build_train_loader(cfg), 4)]
    for state, it in zip(RecordingAtEvaluation.seen, (9, 19)):
        assert torch.equal(state["linear.weight"], raw[it]["linear.weight"]) is not ema
        with torch.no_grad():
            features = torch.cat([F.linear(x, raw[it]["linear.weight"], raw[it]["linear.bias"]) for x in first_batches])
        torch.testing.assert_close(state["bn.running_mean"], features.mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state["bn.running_var"], features.var(0, unbiased=False), rtol=1e-5, atol=1e-5)


def test_precise_bn_leaves_training_unchanged_and_resumes_exactly(tmp_path):
    # Its own loader and the saved RNG states: the parameters trained with it are those trained without it.
    without, _ = train(digits_cfg(tmp_path / "without", *BN_MODEL, "TEST.EVAL_PERIOD", "10"))
    straight, _ = train(digits_cfg(tmp_path / "straight", *BN_MODEL, *PRECISE_BN, "TEST.EVAL_PERIOD", "10"))
    assert_same_weights(dict(straight.model.named_parameters()), dict(without.model.named_parameters()))
    assert not torch.equal(straight.model.bn.running_var, without.model.bn.running_var)
    # Interrupted at iteration 20 (a PreciseBN and evaluation iteration) and resumed: bit for bit, buffers too.
    train(digits_cfg(tmp_path / "split", *BN_MODEL, *PRECISE_BN, "TEST.EVAL_PERIOD", "10", "SOLVER.MAX_ITER", "20"))
    resumed, _ = train(digits_cfg(tmp_path / "split", *BN_MODEL, *PRECISE_BN, "TEST.EVAL_PERIOD", "10"), resume=True)
    assert resumed.start_iter == 20
    assert_same_weights(weights(resumed), weights(straight))
