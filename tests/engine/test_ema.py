import itertools
from fractions import Fraction

import pytest
import torch
from torch import nn

from trainkit.checkpoint import Checkpointer
from trainkit.engine import SimpleTrainer, hooks
from trainkit.engine.ema import EMAHook, ModelEMA


class LinearBN(nn.Module):
    """A linear layer and a BatchNorm: parameters to average, buffers (float and int) to copy."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, batch):
        x, y = batch
        return ((self.bn(self.linear(x)) - y) ** 2).mean()


def _fill(model, value):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def _data(start=0):
    # The batch of iteration i is a pure function of i, so a resumed trainer starts at the right one.
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)) for _ in range(8)]
    return (batches[i % len(batches)] for i in itertools.count(start))


# ---- ModelEMA -----------------------------------------------------------------------------------------------
def test_update_gives_the_closed_form_of_a_constant_target():
    model = LinearBN()
    _fill(model, 0.0)
    ema = ModelEMA(model, decay=0.5)
    _fill(model, 1.0)
    for n in range(1, 6):
        ema.update(model)
        weights = ema.weights()
        for name, _ in model.named_parameters():
            # ema_n = target + decay^n * (ema_0 - target), exactly representable here
            assert torch.equal(weights[name], torch.full_like(weights[name], 1 - 0.5**n)), (name, n)
    assert ema.num_updates == 5


def test_update_follows_the_recurrence_exactly_for_changing_targets():
    model = LinearBN()
    _fill(model, 0.0)
    ema = ModelEMA(model, decay=0.75)
    expected = Fraction(0)
    for target in (4, -8, 16, 2):
        _fill(model, float(target))
        ema.update(model)
        expected = Fraction(3, 4) * expected + Fraction(1, 4) * target
        assert torch.equal(ema.weights()["linear.weight"], torch.full((2, 3), float(expected)))
    assert float(expected) == 2.796875  # 1, -1.25, 3.0625, 2.796875


def test_buffers_are_copied_not_averaged():
    model = LinearBN()
    ema = ModelEMA(model, decay=0.9)
    model(next(_data()))  # train-mode forward: the running statistics and the counter move
    model(next(_data(1)))
    ema.update(model)
    weights = ema.weights()
    assert torch.equal(weights["bn.running_mean"], model.bn.running_mean)
    assert torch.equal(weights["bn.running_var"], model.bn.running_var)
    assert weights["bn.num_batches_tracked"].item() == 2
    assert weights["bn.num_batches_tracked"].dtype == torch.int64
    # The weights are not copies: they keep their own storage.
    assert weights["bn.running_mean"].data_ptr() != model.bn.running_mean.data_ptr()


def test_decay_override_zero_copies_and_one_keeps():
    model = LinearBN()
    initial = {k: v.clone() for k, v in ModelEMA(model).weights().items()}
    ema = ModelEMA(model, decay=0.5)
    _fill(model, 3.0)
    ema.update(model, decay=1.0)
    assert all(torch.equal(ema.weights()[k], initial[k]) for k, _ in model.named_parameters())
    ema.update(model, decay=0.0)
    assert all(torch.equal(ema.weights()[k], p) for k, p in model.named_parameters())


def test_apply_to_swaps_the_ema_weights_in_and_restores_the_originals():
    model = LinearBN()
    ema = ModelEMA(model, decay=0.5)
    _fill(model, 2.0)
    ema.update(model)
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    weight_object = model.linear.weight
    with ema.apply_to(model) as swapped:
        assert swapped is model
        for name, value in ema.weights().items():
            assert torch.equal(model.state_dict()[name], value)
        assert not torch.equal(model.linear.weight, originals["linear.weight"])
    assert model.linear.weight is weight_object  # swapped in place: an optimizer's references stay valid
    for name, value in model.state_dict().items():
        assert torch.equal(value, originals[name])


def test_apply_to_restores_the_originals_when_the_body_raises():
    model = LinearBN()
    ema = ModelEMA(model, decay=0.5)
    _fill(model, 2.0)
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="evaluation failed"):
        with ema.apply_to(model):
            assert torch.equal(model.linear.bias, ema.weights()["linear.bias"])
            raise RuntimeError("evaluation failed")
    for name, value in model.state_dict().items():
        assert torch.equal(value, originals[name])


def test_state_round_trips_through_a_weights_only_file(tmp_path):
    model = LinearBN()
    ema = ModelEMA(model, decay=0.5)
    _fill(model, 1.0)
    for _ in range(3):
        ema.update(model)
    torch.save(ema.state_dict(), tmp_path / "ema.pth")
    state = torch.load(tmp_path / "ema.pth", weights_only=True)
    assert state["num_updates"] == 3

    restored = ModelEMA(LinearBN(), decay=0.5)
    restored.load_state_dict(state)
    assert restored.num_updates == 3
    assert list(restored.weights()) == list(ema.weights())
    for name, value in ema.weights().items():
        assert torch.equal(restored.weights()[name], value)


def test_state_of_another_model_is_a_clear_error():
    ema = ModelEMA(LinearBN())
    other = ModelEMA(nn.Sequential(nn.Linear(3, 2))).state_dict()
    with pytest.raises(KeyError, match=r"missing \['bn.bias'.*unexpected \['0.bias', '0.weight'\]"):
        ema.load_state_dict(other)
    bad = ema.state_dict()
    bad["weights"] = dict(bad["weights"], **{"linear.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match=r"'linear.bias' has shape \(5,\) in the state and \(2,\)"):
        ema.load_state_dict(bad)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\].*got 1.5"):
        ModelEMA(LinearBN(), decay=1.5)
    with pytest.raises(ValueError, match="warmup_iters must be an int >= 0.*got -1"):
        EMAHook(warmup_iters=-1)
    with pytest.raises(ValueError, match="The model has 2 parameters and buffers, the EMA 7"):
        ModelEMA(LinearBN()).update(nn.Linear(3, 2))


def test_a_ddp_model_is_averaged_through_its_module(gloo_group):
    ddp = nn.parallel.DistributedDataParallel(LinearBN())
    _fill(ddp.module, 0.0)
    ema = ModelEMA(ddp, decay=0.5)
    assert list(ema.weights()) == list(ddp.module.state_dict())  # no "module." prefix
    _fill(ddp.module, 1.0)
    ema.update(ddp)
    assert torch.equal(ema.weights()["linear.weight"], torch.full((2, 3), 0.5))
    with ema.apply_to(ddp):
        assert torch.equal(ddp.module.linear.weight, torch.full((2, 3), 0.5))
    assert torch.equal(ddp.module.linear.weight, torch.ones(2, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_update_on_a_gpu_does_not_synchronize_and_can_keep_the_average_on_the_cpu():
    model = LinearBN().cuda()
    ema = ModelEMA(model, decay=0.5)
    cpu_ema = ModelEMA(model, decay=0.5, device="cpu")
    _fill(model, 1.0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            ema.update(model)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu_ema.update(model)
    assert torch.equal(ema.weights()["linear.bias"].cpu(), torch.full((2,), 1 - 0.5**3))
    assert cpu_ema.weights()["linear.bias"].device.type == "cpu"
    with cpu_ema.apply_to(model):
        assert model.linear.bias.device.type == "cuda"


# ---- EMAHook ------------------------------------------------------------------------------------------------
def _trainer(start_iter=0):
    model = LinearBN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return SimpleTrainer(model, _data(start_iter), optimizer, gather_metric_period=1)


def test_warmup_ramps_the_decay_linearly_from_zero():
    hook = EMAHook(decay=0.9, warmup_iters=4)
    assert [hook.decay_at(n) for n in range(6)] == [0.0, 0.9 * 1 / 4, 0.9 * 2 / 4, 0.9 * 3 / 4, 0.9, 0.9]
    assert EMAHook(decay=0.9).decay_at(0) == 0.9


def test_hook_updates_after_every_optimizer_step():
    trainer = _trainer()
    ema_hook = EMAHook(decay=0.5, warmup_iters=2)
    seen = []
    record = hooks.CallbackHook(after_step=lambda t: seen.append({k: v.clone() for k, v in t.model.state_dict().items()}))
    expected = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.register_hooks([ema_hook, record])
    trainer.train(0, 5)
    for n, weights in enumerate(seen):
        decay = ema_hook.decay_at(n)  # 0, 0.25, 0.5, 0.5, 0.5
        for name, value in weights.items():
            averaged = name.startswith("linear") or name in ("bn.weight", "bn.bias")
            expected[name] = torch.lerp(expected[name], value, 1 - decay) if averaged else value
    assert ema_hook.ema.num_updates == 5
    for name, value in ema_hook.ema.weights().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-7, msg=name)
    assert not torch.equal(ema_hook.ema.weights()["linear.weight"], trainer.model.linear.weight)


def test_resume_continues_the_average_exactly(tmp_path):
    warmup = 6  # the warm-up crosses the resume: the number of updates must be restored too
    straight = _trainer()
    straight_hook = EMAHook(decay=0.8, warmup_iters=warmup)
    straight.register_hooks([straight_hook])
    straight.train(0, 8)

    first = _trainer()
    first.register_hooks([EMAHook(decay=0.8, warmup_iters=warmup)])
    first.train(0, 4)
    Checkpointer(first.model, str(tmp_path), trainer=first).save("model_0000003", iteration=3)

    resumed = _trainer(start_iter=4)
    resumed_hook = EMAHook(decay=0.8, warmup_iters=warmup)
    resumed.register_hooks([resumed_hook])
    Checkpointer(resumed.model, str(tmp_path), trainer=resumed).resume_or_load("", resume=True)
    assert resumed_hook.ema.num_updates == 4
    resumed.train(4, 8)

    assert resumed_hook.ema.num_updates == straight_hook.ema.num_updates == 8
    for name, value in straight_hook.ema.weights().items():
        assert torch.equal(resumed_hook.ema.weights()[name], value), name
    assert torch.equal(resumed.model.linear.weight, straight.model.linear.weight)


def test_the_documented_ema_evaluation_runs_with_default_trainer(tmp_path):
    from tests.engine.test_hooks_best_early import default_trainer, digits_cfg

    cfg = digits_cfg(tmp_path, "SOLVER.MAX_ITER", 20, "SOLVER.CHECKPOINT_PERIOD", 100)
    ema_hook = EMAHook(decay=0.9, warmup_iters=5)
    ema_results = []

    def make_hooks(trainer):
        def evaluate_ema():
            with ema_hook.ema.apply_to(trainer.model):
                results = {"ema": trainer.test(cfg, trainer.model)}
            ema_results.append(results)
            return results

        return [ema_hook, hooks.EvalHook(cfg.TEST.EVAL_PERIOD, evaluate_ema)]

    trainer = default_trainer(cfg, make_hooks)
    trainer.train()
    top1 = trainer.storage.history("ema/classification/top1")
    assert [it for _, it in top1.values()] == [9, 19]
    assert [v for v, _ in top1.values()] == [r["ema"]["classification"]["top1"] for r in ema_results]
    assert ema_hook.ema.num_updates == 20
    final = torch.load(tmp_path / "model_final.pth", weights_only=True)["trainer"]["hooks"]["EMAHook"]
    assert final["num_updates"] == 20
    for name, value in ema_hook.ema.weights().items():
        assert torch.equal(final["weights"][name], value), name
