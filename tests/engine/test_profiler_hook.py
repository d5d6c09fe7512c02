import itertools
import json

import pytest
import torch
from torch import nn

from trainkit.engine import HookBase, SimpleTrainer, hooks


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)

    def forward(self, batch):
        x, y = batch
        return ((self.linear(x) - y) ** 2).mean()


def _trainer():
    model = Regressor()
    data = [(torch.randn(8, 4), torch.randn(8, 1))]
    return SimpleTrainer(model, itertools.cycle(data), torch.optim.SGD(model.parameters(), lr=0.1))


def _event_names(path):
    with open(path, encoding="utf-8") as f:
        trace = json.load(f)
    return {event.get("name") for event in trace["traceEvents"]}


def test_chrome_traces_are_written_for_exactly_the_predicate_iterations(tmp_path):
    trainer = _trainer()
    trainer.register_hooks(
        [hooks.TorchProfiler(lambda t: t.iter in (2, 5), str(tmp_path), save_tensorboard=False)]
    )
    trainer.train(0, 7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profiler-trace-iter2.json", "profiler-trace-iter5.json"]
    for path in tmp_path.iterdir():
        names = _event_names(path)
        # The profiled step: the forward's matrix product, its backward, and the optimizer step.
        assert "aten::addmm" in names
        assert any(name and "Optimizer.step#SGD.step" in name for name in names)
    assert not torch._C._autograd._profiler_enabled()


def test_tensorboard_traces_go_to_one_folder_per_profiled_iteration(tmp_path):
    trainer = _trainer()
    trainer.register_hooks([hooks.TorchProfiler(lambda t: t.iter == 1, str(tmp_path))])
    trainer.train(0, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["log"]
    folders = list((tmp_path / "log").iterdir())
    assert [f.name for f in folders] == ["profiler-tensorboard-iter1"]
    traces = list(folders[0].iterdir())
    assert len(traces) == 1 and traces[0].name.startswith("worker0.") and traces[0].name.endswith(".pt.trace.json")
    assert "aten::addmm" in _event_names(traces[0])


class FailAt(HookBase):
    def __init__(self, iteration):
        self.iteration = iteration

    def before_step(self):
        if self.trainer.iter == self.iteration:
            raise RuntimeError(f"failed at {self.iteration}")


def test_a_step_that_raises_while_profiling_stops_the_profiler_without_writing(tmp_path):
    trainer = _trainer()
    trainer.register_hooks(
        [hooks.TorchProfiler(lambda t: t.iter >= 1, str(tmp_path), save_tensorboard=False), FailAt(2)]
    )
    with pytest.raises(RuntimeError, match="failed at 2"):
        trainer.train(0, 5)
    assert [p.name for p in tmp_path.iterdir()] == ["profiler-trace-iter1.json"]
    assert not torch._C._autograd._profiler_enabled()
    # Profiling works again afterwards.
    again = _trainer()
    again.register_hooks([hooks.TorchProfiler(lambda t: t.iter == 0, str(tmp_path / "again"), save_tensorboard=False)])
    again.train(0, 1)
    assert [p.name for p in (tmp_path / "again").iterdir()] == ["profiler-trace-iter0.json"]
