"""Gradient accumulation in one process: k micro-batches of b samples make the same optimizer step as one
batch of k*b (float tolerance), with plain precision, bfloat16 autocast and a float16 grad scaler; the losses
recorded are the means over the micro-batches; DefaultTrainer takes it from SOLVER.GRAD_ACCUM_STEPS, resumes
exactly with it, and refuses a batch that does not divide.

The all-reduce count under DistributedDataParallel is in test_grad_accum_two_processes.py.
"""
import itertools
import shutil
import time

import pytest
import torch

from tests.engine.accumulation_parts import TwoMeanLosses
from tests.engine.digits_runs import digits_cfg, train, weights
from trainkit.engine import AMPTrainer, DefaultTrainer, HookBase, SimpleTrainer

MICRO, K, ITERS = 4, 3, 4  # micro-batch size, micro-batches per step, optimizer steps


def _batches(n, size):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 6, generator=g), torch.randn(size, 2, generator=g)) for _ in range(n)]


def _merged(batches, k):
    """Every k consecutive micro-batches as one batch: what one step of the accumulating run sees."""
    return [tuple(torch.cat(parts) for parts in zip(*batches[i:i + k])) for i in range(0, len(batches), k)]


class _CountSteps(HookBase):
    def __init__(self):
        self.after_backward_calls = 0

    def after_backward(self):
        self.after_backward_calls += 1


def _run(trainer_cls, data, k, **kwargs):
    model = TwoMeanLosses()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    steps = []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    trainer = trainer_cls(model, iter(data), optimizer, gather_metric_period=2, grad_accum_steps=k, **kwargs)
    counter = _CountSteps()
    trainer.register_hooks([counter])
    trainer.train(0, ITERS)
    recorded = {name: trainer.storage.history(name).values() for name in ("total_loss", "loss_mse", "loss_l1")}
    return trainer, model, recorded, len(steps), counter.after_backward_calls


def _assert_close_weights(a, b, **tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("zero_grad_before_forward", [False, True])
def test_k_micro_batches_make_the_same_step_as_one_batch_k_times_as_large(zero_grad_before_forward):
    micro = _batches(K * ITERS, MICRO)
    _, accumulated, acc_losses, acc_steps, acc_backward = _run(
        SimpleTrainer, micro, K, zero_grad_before_forward=zero_grad_before_forward
    )
    _, whole, whole_losses, whole_steps, _ = _run(
        SimpleTrainer, _merged(micro, K), 1, zero_grad_before_forward=zero_grad_before_forward
    )
    _assert_close_weights(accumulated, whole, rtol=1e-5, atol=1e-6)
    assert acc_steps == whole_steps == ITERS  # one optimizer step per iteration
    assert acc_backward == ITERS  # the after_backward hooks run once per step, after the last micro-batch
    # The recorded losses are the means over the micro-batches: those of the whole batch, once per iteration.
    for name, values in acc_losses.items():
        assert [it for _, it in values] == list(range(ITERS))
        torch.testing.assert_close([v for v, _ in values], [v for v, _ in whole_losses[name]], rtol=1e-5, atol=1e-6)


def test_accumulation_draws_k_micro_batches_per_step_and_sums_their_data_time():
    drawn = []

    def slow_loader():
        for batch in itertools.cycle(_batches(K, MICRO)):
            time.sleep(0.01)
            drawn.append(1)
            yield batch

    trainer, _, _, _, _ = _run(SimpleTrainer, slow_loader(), K)
    assert len(drawn) == K * ITERS
    assert all(t >= K * 0.01 for t, _ in trainer.storage.history("data_time").values())


def test_the_first_micro_batch_zeroes_the_gradients_and_the_others_add_to_them():
    # Gradients left over from before the step (a hook, a user's probe) must not leak into it.
    micro = _batches(K * ITERS, MICRO)
    model = TwoMeanLosses()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay: grads are comparable
    trainer = SimpleTrainer(model, iter(micro), optimizer, grad_accum_steps=K)
    for p in model.parameters():
        p.grad = torch.full_like(p, 100.0)
    trainer.train(0, 1)
    reference = TwoMeanLosses()
    batch = _merged(micro, K)[0]
    sum(reference(batch).values()).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def test_bfloat16_autocast_accumulates_to_the_step_of_the_whole_batch():
    micro = _batches(K * ITERS, MICRO)
    _, accumulated, _, _, _ = _run(AMPTrainer, micro, K, precision=torch.bfloat16)
    _, whole, _, _, _ = _run(AMPTrainer, _merged(micro, K), 1, precision=torch.bfloat16)
    # bfloat16 keeps 8 bits of mantissa: the micro-batches' products round differently from the whole
    # batch's, so the tolerance is bfloat16's (the weights themselves stay float32).
    _assert_close_weights(accumulated, whole, rtol=2e-2, atol=2e-3)


def test_the_float16_grad_scaler_steps_and_updates_once_per_optimizer_step():
    # growth_interval=1: the scale doubles at every update without an inf, so it counts the updates.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    micro = _batches(K * ITERS, MICRO)
    _, accumulated, _, steps, _ = _run(AMPTrainer, micro, K, precision=torch.float16, grad_scaler=scaler)
    assert steps == ITERS
    assert scaler.get_scale() == 2.0 ** (10 + ITERS)
    _, whole, _, _, _ = _run(
        AMPTrainer, _merged(micro, K), 1, precision=torch.float16,
        grad_scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1),
    )
    _assert_close_weights(accumulated, whole, rtol=1e-2, atol=2e-3)


@pytest.mark.parametrize("k", [0, -1, 2.0])
def test_grad_accum_steps_must_be_a_whole_number_of_at_least_one(k):
    model = TwoMeanLosses()
    with pytest.raises(ValueError, match="grad_accum_steps must be a whole number >= 1"):
        SimpleTrainer(model, [], torch.optim.SGD(model.parameters(), lr=0.1), grad_accum_steps=k)


def test_micro_batches_that_return_other_loss_names_are_an_error():
    class Changing(TwoMeanLosses):
        calls = 0

        def forward(self, batch):
            self.calls += 1
            losses = super().forward(batch)
            return losses if self.calls % 2 else {"loss_mse": losses["loss_mse"]}

    model = Changing()
    trainer = SimpleTrainer(model, iter(_batches(4, MICRO)), torch.optim.SGD(model.parameters(), lr=0.1),
                            grad_accum_steps=2)
    with pytest.raises(ValueError, match="other losses in the micro-batches of one step"):
        trainer.train(0, 1)


# ---- DefaultTrainer, from the config --------------------------------------------------------------------------
ACCUM = ["SOLVER.IMS_PER_BATCH", "32", "SOLVER.GRAD_ACCUM_STEPS", "4"]


def test_default_trainer_accumulates_from_the_config_to_the_weights_of_the_whole_batch(tmp_path):
    whole, _ = train(digits_cfg(tmp_path / "whole", "SOLVER.IMS_PER_BATCH", "32", "SOLVER.MAX_ITER", "20"))
    accumulated, _ = train(digits_cfg(tmp_path / "accum", *ACCUM, "SOLVER.MAX_ITER", "20"))
    assert accumulated._trainer.grad_accum_steps == 4
    assert accumulated.data_loader.batch_sampler.batch_size == 8  # the loader yields micro-batches
    a, b = weights(accumulated), weights(whole)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    # The LR schedule counted optimizer steps: both runs end at the same learning rate.
    assert accumulated.storage.latest_value("lr") == whole.storage.latest_value("lr")


def test_default_trainer_resumes_an_accumulating_run_exactly(tmp_path):
    # The loader continues at micro-batch start_iter * GRAD_ACCUM_STEPS: the resumed run sees the same data.
    reference, _ = train(digits_cfg(tmp_path / "ref", *ACCUM))
    (tmp_path / "copy").mkdir()
    shutil.copy(tmp_path / "ref" / "model_0000019.pth", tmp_path / "copy")
    (tmp_path / "copy" / "last_checkpoint").write_text("model_0000019.pth")
    resumed, _ = train(digits_cfg(tmp_path / "copy", *ACCUM), resume=True)
    assert resumed.start_iter == 20
    a, b = weights(resumed), weights(reference)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_a_batch_that_does_not_divide_into_the_micro_batches_is_an_error_at_start(tmp_path):
    cfg = digits_cfg(tmp_path, "SOLVER.IMS_PER_BATCH", "30", "SOLVER.GRAD_ACCUM_STEPS", "4")
    with pytest.raises(ValueError) as e:
        DefaultTrainer(cfg)
    message = str(e.value)
    assert "SOLVER.IMS_PER_BATCH (30)" in message and "SOLVER.GRAD_ACCUM_STEPS (4)" in message
    assert "multiple of 4" in message and "divisor of 30" in message


def test_grad_accum_steps_below_one_is_a_config_range_error(tmp_path):
    with pytest.raises(ValueError, match="SOLVER.GRAD_ACCUM_STEPS is 0, out of its range"):
        DefaultTrainer(digits_cfg(tmp_path, "SOLVER.GRAD_ACCUM_STEPS", "0"))


def test_a_nan_loss_in_one_micro_batch_stops_its_iteration_before_the_optimizer_step():
    micro = _batches(K * ITERS, MICRO)
    micro[K * 2 + 1] = (torch.full((MICRO, 6), float("nan")), micro[K * 2 + 1][1])  # iteration 2, micro-batch 1
    model = TwoMeanLosses()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    trainer = SimpleTrainer(model, iter(micro), optimizer, gather_metric_period=20, grad_accum_steps=K)
    with pytest.raises(FloatingPointError, match="iteration=2"):
        trainer.train(0, ITERS)
    assert len(steps) == 2 and all(torch.isfinite(p).all() for p in model.parameters())
    assert [it for _, it in trainer.storage.history("total_loss").values()] == [0, 1]
