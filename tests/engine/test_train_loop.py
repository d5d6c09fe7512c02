import collections
import gc
import hashlib
import itertools
import json
import weakref

import pytest
import torch
from torch import nn

from trainkit.engine import AMPTrainer, HookBase, SimpleTrainer, TrainerBase, hooks
from trainkit.utils.events import CommonMetricPrinter, JSONWriter, get_event_storage


class TwoLossModel(nn.Module):
    """A linear regressor returning two losses; optionally NaN from a given forward call on."""

    def __init__(self, nan_from_call=None):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)
        self.calls = 0
        self.nan_from_call = nan_from_call

    def forward(self, batch):
        x, y = batch
        loss = ((self.linear(x) - y) ** 2).mean()
        if self.nan_from_call is not None and self.calls >= self.nan_from_call:
            loss = loss * float("nan")
        self.calls += 1
        return {"loss_mse": loss, "loss_l1": 0.01 * self.linear.weight.abs().sum()}


def make_data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(n)]


def make_trainer(cls=SimpleTrainer, model=None, **kwargs):
    model = model or TwoLossModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return cls(model, itertools.cycle(make_data()), opt, **kwargs)


class Recorder(HookBase):
    def __init__(self, name, log):
        self.name, self.log = name, log

    def before_train(self):
        self.log.append((self.name, "before_train", self.trainer.iter))

    def after_train(self):
        self.log.append((self.name, "after_train", self.trainer.iter))

    def before_step(self):
        assert self.trainer.storage.iter == self.trainer.iter
        self.log.append((self.name, "before_step", self.trainer.iter))

    def after_backward(self):
        self.log.append((self.name, "after_backward", self.trainer.iter))

    def after_step(self):
        assert self.trainer.storage.iter == self.trainer.iter
        self.log.append((self.name, "after_step", self.trainer.iter))


def test_hooks_run_in_registration_order_at_each_point():
    log = []
    trainer = make_trainer()
    trainer.register_hooks([Recorder("a", log), None, Recorder("b", log)])
    trainer.train(3, 5)
    expected = [("a", "before_train", 3), ("b", "before_train", 3)]
    for it in (3, 4):
        for point in ("before_step", "after_backward", "after_step"):
            expected += [("a", point, it), ("b", point, it)]
    expected += [("a", "after_train", 5), ("b", "after_train", 5)]
    assert log == expected
    assert trainer.iter == 5 and trainer.start_iter == 3 and trainer.max_iter == 5


def test_a_hook_method_assigned_on_the_instance_is_called_at_its_point():
    calls = []
    hook = HookBase()
    hook.before_step = lambda: calls.append(("before_step", hook.trainer.iter))
    trainer = make_trainer()
    trainer.register_hooks([hook])
    hook.after_step = lambda: calls.append(("after_step", hook.trainer.iter))  # also after registration
    trainer.train(0, 2)
    assert calls == [("before_step", 0), ("after_step", 0), ("before_step", 1), ("after_step", 1)]


def test_hooks_hold_a_weak_reference_and_make_no_cycle():
    gc.disable()
    try:
        trainer = make_trainer()
        hook = Recorder("a", [])
        trainer.register_hooks([hook])
        assert isinstance(hook.trainer, weakref.ProxyType)
        ref = weakref.ref(trainer)
        del trainer
        assert ref() is None  # freed by reference counting alone
    finally:
        gc.enable()


def test_register_hooks_rejects_non_hooks():
    with pytest.raises(TypeError, match="HookBase"):
        make_trainer().register_hooks([lambda: None])


def test_after_train_runs_when_a_step_raises_and_the_error_propagates():
    log = []

    class Boom(HookBase):
        def after_step(self):
            if self.trainer.iter == 2:
                raise ValueError("boom at 2")

    trainer = make_trainer()
    trainer.register_hooks([Recorder("r", log), Boom()])
    with pytest.raises(ValueError, match="boom at 2"):
        trainer.train(0, 10)
    assert log[-1] == ("r", "after_train", 2)
    assert trainer.iter == 2


def test_every_after_train_runs_when_one_raises_and_the_first_error_propagates(tmp_path):
    log = []

    class RaisesAtEnd(HookBase):
        def __init__(self, message):
            self.message = message

        def after_train(self):
            raise RuntimeError(self.message)

    path = tmp_path / "metrics.json"
    trainer = make_trainer()
    trainer.register_hooks([RaisesAtEnd("first"), Recorder("r", log), RaisesAtEnd("second"),
                            hooks.PeriodicWriter([JSONWriter(str(path))], period=100)])
    with pytest.raises(RuntimeError, match="first"):
        trainer.train(0, 5)
    assert log[-1] == ("r", "after_train", 5)
    # The writer registered after both failing hooks still wrote the last iteration and closed its file.
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [4]


def test_every_iteration_metrics_reach_the_storage_exactly():
    # Reference: the same model and data trained by hand, recording each iteration's losses.
    ref_model = TwoLossModel()
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05)
    expected = []
    for batch in itertools.islice(itertools.cycle(make_data()), 30):
        d = ref_model(batch)
        total = d["loss_mse"] + d["loss_l1"]
        expected.append((d["loss_mse"].item(), d["loss_l1"].item(), total.item()))
        ref_opt.zero_grad()
        total.backward()
        ref_opt.step()

    seen = {}
    trainer = make_trainer(gather_metric_period=7)
    trainer.register_hooks([hooks.CallbackHook(after_train=lambda t: seen.update(t.storage.histories()))])
    trainer.train(0, 30)
    for name, col in (("loss_mse", 0), ("loss_l1", 1), ("total_loss", 2)):
        values = seen[name].values()
        assert [it for _, it in values] == list(range(30))
        assert [v for v, _ in values] == pytest.approx([e[col] for e in expected], rel=1e-6, abs=1e-7)
    assert [it for _, it in seen["data_time"].values()] == list(range(30))
    assert torch.equal(trainer.model.linear.weight, ref_model.linear.weight)


def test_a_single_tensor_counts_as_total_loss():
    class TensorModel(TwoLossModel):
        def forward(self, batch):
            return super().forward(batch)["loss_mse"]

    seen = {}
    trainer = make_trainer(model=TensorModel())
    trainer.register_hooks([hooks.CallbackHook(after_train=lambda t: seen.update(t.storage.histories()))])
    trainer.train(0, 5)
    assert sorted(seen) == ["data_time", "total_loss"]
    assert len(seen["total_loss"].values()) == 5


@pytest.mark.parametrize("period", [1, 20])
def test_non_finite_loss_names_the_first_bad_iteration(tmp_path, period):
    ckpt = tmp_path / "model_0000003.pth"
    written_at = []

    def save(t):
        if t.iter == 3:
            torch.save(t.model.state_dict(), ckpt)
            written_at.append(hashlib.sha256(ckpt.read_bytes()).hexdigest())

    trainer = make_trainer(model=TwoLossModel(nan_from_call=7), gather_metric_period=period)
    trainer.register_hooks([hooks.CallbackHook(after_step=save)])
    with pytest.raises(FloatingPointError, match=r"iteration=7!") as e:
        trainer.train(0, 30)
    assert "loss_mse" in str(e.value) and "nan" in str(e.value)
    # CPU losses are checked in their own iteration whatever the period, as in detectron2 (whose default period
    # is 1): training stops in iteration 7, before its optimizer step, so the weights are still finite.
    assert trainer.iter == 7
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == written_at[0]
    assert trainer.storage.history("total_loss").values()[-1][1] == 6  # the iterations before it were put


class _TransferCounter:
    """Records trainer.iter at every Tensor.item / .cpu / .tolist / float(tensor) call."""

    def __init__(self, monkeypatch, trainer):
        self.iters = []
        for name in ("item", "cpu", "tolist", "__float__"):
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.iters.append(trainer.iter)
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def _trainer_with_default_hooks(tmp_path, period):
    trainer = make_trainer(gather_metric_period=period)
    trainer.scheduler = torch.optim.lr_scheduler.StepLR(trainer.optimizer, 10)
    writers = [JSONWriter(str(tmp_path / "metrics.json")), CommonMetricPrinter(60)]
    trainer.register_hooks([hooks.IterationTimer(), hooks.LRScheduler(), hooks.PeriodicWriter(writers, period)])
    return trainer


def test_between_two_gathers_a_cpu_step_reads_only_its_total_loss(tmp_path, monkeypatch):
    # On the CPU the step reads its total loss (to stop at a NaN at once; no device to wait for) and nothing
    # else: the losses themselves reach the host at the gathers. On CUDA (below) not even that.
    trainer = _trainer_with_default_hooks(tmp_path, period=20)
    counter = _TransferCounter(monkeypatch, trainer)
    trainer.train(0, 60)
    gathers = {19, 39, 59, 60}
    assert set(counter.iters) & gathers, "the gathers themselves must move metrics to the host"
    between = collections.Counter(it for it in counter.iters if it not in gathers)
    assert between == {it: 1 for it in range(60) if it not in gathers}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_transfer_between_two_gathers_on_cuda(tmp_path, monkeypatch):
    trainer = _trainer_with_default_hooks(tmp_path, period=20)
    trainer.model.cuda()
    trainer.data_loader = ((x.cuda(), y.cuda()) for x, y in itertools.cycle(make_data()))
    counter = _TransferCounter(monkeypatch, trainer)
    trainer.train(0, 60)
    assert counter.iters and set(counter.iters) <= {19, 39, 59, 60}, sorted(set(counter.iters))


def test_gather_period_one_transfers_every_step(tmp_path, monkeypatch):
    trainer = _trainer_with_default_hooks(tmp_path, period=1)
    counter = _TransferCounter(monkeypatch, trainer)
    trainer.train(0, 10)
    assert set(range(10)) <= set(counter.iters)


def test_model_put_scalar_reaches_the_json_file(tmp_path):
    class Reporting(TwoLossModel):
        def forward(self, batch):
            out = super().forward(batch)
            get_event_storage().put_scalar("weight_norm", self.linear.weight.detach().norm())
            return out

    trainer = make_trainer(model=Reporting())
    path = tmp_path / "metrics.json"
    trainer.register_hooks([hooks.PeriodicWriter([JSONWriter(str(path))], period=5)])
    trainer.train(0, 10)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [4, 9]
    assert all("weight_norm" in line and line["weight_norm"] > 0 for line in lines)


def test_state_dict_holds_iteration_optimizer_and_hook_states():
    class Counting(HookBase):
        def __init__(self):
            self.count = 0

        def after_step(self):
            self.count += 1

        def state_dict(self):
            return {"count": self.count}

        def load_state_dict(self, state):
            self.count = state["count"]

    trainer = make_trainer()
    trainer.register_hooks([Counting()])
    trainer.train(0, 4)
    state = trainer.state_dict()
    assert state["iteration"] == 4
    assert state["hooks"] == {"test_state_dict_holds_iteration_optimizer_and_hook_states.<locals>.Counting": {"count": 4}}
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.05

    other = make_trainer()
    hook = Counting()
    other.register_hooks([hook])
    other.load_state_dict(state)
    assert other.iter == 4 and hook.count == 4


def test_zero_grad_before_forward_gives_the_same_training():
    a, b = make_trainer(), make_trainer(zero_grad_before_forward=True)
    a.train(0, 12)
    b.train(0, 12)
    assert torch.equal(a.model.linear.weight, b.model.linear.weight)


def test_async_write_metrics_delivers_every_iteration_with_the_same_values():
    results = []
    for async_write in (False, True):
        seen = {}
        trainer = make_trainer(gather_metric_period=5, async_write_metrics=async_write)
        trainer.register_hooks([hooks.CallbackHook(after_train=lambda t: seen.update(t.storage.histories()))])
        trainer.train(0, 23)
        results.append(seen["total_loss"].values())
    assert results[0] == results[1]
    assert [it for _, it in results[1]] == list(range(23))


def test_amp_bfloat16_trains_on_cpu_under_autocast():
    class Probe(TwoLossModel):
        def forward(self, batch):
            self.autocast_dtype = self.linear(batch[0]).dtype
            return super().forward(batch)

    trainer = make_trainer(AMPTrainer, model=Probe(), precision=torch.bfloat16)
    assert trainer.grad_scaler is None
    seen = {}
    trainer.register_hooks([hooks.CallbackHook(after_train=lambda t: seen.update(t.storage.histories()))])
    trainer.train(0, 40)
    assert trainer.model.autocast_dtype == torch.bfloat16
    losses = [v for v, _ in seen["loss_mse"].values()]
    assert losses[-1] < losses[0]
    assert "grad_scaler" not in trainer.state_dict()


def test_amp_float16_uses_a_grad_scaler_whose_state_is_saved():
    trainer = make_trainer(AMPTrainer, log_grad_scaler=True)
    trainer.train(0, 5)
    state = trainer.state_dict()
    assert state["grad_scaler"]["scale"] == trainer.grad_scaler.get_scale()
    other = make_trainer(AMPTrainer)
    other.load_state_dict(state)
    assert other.grad_scaler.get_scale() == trainer.grad_scaler.get_scale()


def test_amp_rejects_other_precisions():
    with pytest.raises(ValueError, match="float16 or torch.bfloat16"):
        make_trainer(AMPTrainer, precision=torch.float32)


def test_the_documented_print_every_100_hook_runs(capsys):
    class PrintEvery100(HookBase):
        def after_step(self):
            if (self.trainer.iter + 1) % 100 == 0:
                print(f"iteration {self.trainer.iter}: lr={self.trainer.optimizer.param_groups[0]['lr']}")

    trainer = make_trainer()
    trainer.register_hooks([PrintEvery100()])
    trainer.train(0, 250)
    assert capsys.readouterr().out.splitlines() == ["iteration 99: lr=0.05", "iteration 199: lr=0.05"]


def test_trainer_base_requires_run_step():
    with pytest.raises(NotImplementedError):
        TrainerBase().train(0, 1)


def test_a_loss_named_total_loss_besides_others_is_a_clear_error():
    class Clashing(TwoLossModel):
        def forward(self, batch):
            out = super().forward(batch)
            return {"total_loss": out["loss_mse"], "loss_l1": out["loss_l1"]}

    with pytest.raises(ValueError, match="named 'total_loss' besides other losses"):
        make_trainer(model=Clashing()).train(0, 3)
