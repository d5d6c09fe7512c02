"""EMA from the config (MODEL_EMA.*) in DefaultTrainer: the average, evaluation on it, checkpoints, resume.

Short runs of the digits MLP, as in test_defaults.py.
"""
import re

import pytest
import torch

from tests.engine.digits_runs import (
    CONSTANT_LR,
    RecordingAtEvaluation,
    assert_same_weights,
    digits_cfg,
    read_metrics,
    train,
    weights,
)
from trainkit.engine import DefaultTrainer, hooks
from trainkit.modeling import build_model

DECAY, WARMUP = 0.8, 6


def ema_cfg(output_dir, *opts):
    return digits_cfg(
        output_dir, "MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY", str(DECAY), "MODEL_EMA.WARMUP_ITERS", str(WARMUP),
        *opts,
    )


class WeightRecorder(hooks.CallbackHook):
    """Records the raw weights after every optimizer step (registered after the defaults)."""

    def __init__(self):
        self.raw = []
        super().__init__(after_step=lambda t: self.raw.append(weights(t)))


def ema_hook_of(trainer):
    return next(h for h in trainer._hooks if isinstance(h, hooks.EMAHook))


def closed_form_ema(initial, recorded, decay, warmup):
    """The EMA after len(recorded) updates as one weighted sum: update n (0-based) has decay
    d_n = decay * min(1, n / warmup), and weight w_k enters with (1 - d_k) * prod_{j > k} d_j."""
    decays = [decay * min(1.0, n / warmup) if warmup else decay for n in range(len(recorded))]
    result = {}
    for name in initial:
        total = torch.prod(torch.tensor(decays, dtype=torch.float64)) * initial[name].double()
        for k, w in enumerate(recorded):
            later = torch.prod(torch.tensor(decays[k + 1:], dtype=torch.float64))
            total = total + (1 - decays[k]) * later * w[name].double()
        result[name] = total.float()
    return result


def test_the_ema_weights_equal_the_closed_form_ema_of_the_recorded_weights(tmp_path):
    cfg = ema_cfg(tmp_path, "SOLVER.MAX_ITER", "15", "MODEL.MLP.DROPOUT", "0.2")
    recorder = WeightRecorder()
    trainer = DefaultTrainer(cfg)
    initial = weights(trainer)
    trainer.register_hooks([recorder])
    trainer.resume_or_load(resume=False)
    trainer.train()
    ema = ema_hook_of(trainer).ema
    assert ema.num_updates == len(recorder.raw) == 15
    expected = closed_form_ema(initial, recorder.raw, DECAY, WARMUP)
    for name, value in ema.weights().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(ema.weights()["layers.0.weight"], trainer.model.layers[0].weight)
    # The checkpoint holds the average, loadable with weights_only.
    saved = torch.load(tmp_path / "model_final.pth", weights_only=True)["trainer"]["hooks"]["EMAHook"]
    assert saved["num_updates"] == 15
    assert_same_weights(saved["weights"], ema.weights())


def test_use_for_eval_evaluates_that_iterations_ema_and_training_continues_on_the_raw_weights(tmp_path):
    cfg = ema_cfg(tmp_path, "SOLVER.MAX_ITER", "20", "TEST.EVAL_PERIOD", "10")
    emas = {}
    record_ema = hooks.CallbackHook(
        after_step=lambda t: emas.update({t.iter: {k: v.clone() for k, v in ema_hook_of(t).ema.weights().items()}})
    )
    recorder = WeightRecorder()
    RecordingAtEvaluation.seen = []
    trainer, results = train(cfg, RecordingAtEvaluation, extra_hooks=[recorder, record_ema])
    kinds = [type(h) for h in trainer._hooks]
    assert kinds.index(hooks.EMAHook) < kinds.index(hooks.EvalHook)
    # The evaluations after iterations 9 and 19 saw the EMA of their own iteration, not the raw weights.
    assert len(RecordingAtEvaluation.seen) == 2
    for seen, it in zip(RecordingAtEvaluation.seen, (9, 19)):
        assert_same_weights(seen, emas[it])
        assert not torch.equal(seen["layers.0.weight"], recorder.raw[it]["layers.0.weight"])
    # Training went on with the raw weights: the model ends with the last step's raw weights.
    assert_same_weights(weights(trainer), recorder.raw[-1])
    # The accuracy is the EMA model's: the EMA weights loaded into a plain model evaluate to the same.
    plain = build_model(cfg)
    plain.load_state_dict(ema_hook_of(trainer).ema.weights())
    assert DefaultTrainer.test(cfg, plain) == results
    assert read_metrics(tmp_path)[-1]["classification/top1"] == results["classification"]["top1"]


def test_without_use_for_eval_the_raw_weights_are_evaluated(tmp_path):
    cfg = ema_cfg(tmp_path, "SOLVER.MAX_ITER", "10", "MODEL_EMA.USE_FOR_EVAL", "False")
    RecordingAtEvaluation.seen = []
    trainer, results = train(cfg, RecordingAtEvaluation)
    assert_same_weights(RecordingAtEvaluation.seen[-1], weights(trainer))
    assert DefaultTrainer.test(cfg, trainer.model) == results


def test_a_run_with_ema_interrupted_and_resumed_ends_with_the_same_raw_and_ema_weights_bit_for_bit(tmp_path):
    # The warm-up (30 updates) crosses the resume at 20; dropout and momentum cover the RNG and optimizer states.
    opts = ["MODEL.MLP.DROPOUT", "0.3", "MODEL_EMA.WARMUP_ITERS", "30", "TEST.EVAL_PERIOD", "10", *CONSTANT_LR]
    straight, straight_results = train(ema_cfg(tmp_path / "straight", *opts))
    train(ema_cfg(tmp_path / "split", *opts, "SOLVER.MAX_ITER", "20"))
    resumed, resumed_results = train(ema_cfg(tmp_path / "split", *opts), resume=True)
    assert resumed.start_iter == 20
    assert_same_weights(weights(resumed), weights(straight))
    assert ema_hook_of(resumed).ema.num_updates == ema_hook_of(straight).ema.num_updates == 40
    assert_same_weights(ema_hook_of(resumed).ema.weights(), ema_hook_of(straight).ema.weights())
    assert resumed_results == straight_results


@pytest.mark.parametrize(
    "key, value, shown", [("MODEL_EMA.DECAY", "1.5", "in [0, 1]"), ("MODEL_EMA.WARMUP_ITERS", "-1", "updates >= 0")]
)
def test_an_out_of_range_ema_key_is_a_clear_error(tmp_path, key, value, shown):
    with pytest.raises(ValueError, match=f"{key} is {value}.*{re.escape(shown)}"):
        DefaultTrainer(ema_cfg(tmp_path, key, value))


def test_ema_turned_on_at_a_resume_starts_from_the_resumed_weights(tmp_path):
    first, _ = train(digits_cfg(tmp_path, "SOLVER.MAX_ITER", "10", *CONSTANT_LR))
    # DECAY 1 keeps the average at its start, which must be the checkpoint's weights.
    resumed, _ = train(
        digits_cfg(
            tmp_path, "SOLVER.MAX_ITER", "15", "MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY", "1.0", *CONSTANT_LR
        ),
        resume=True,
    )
    assert resumed.start_iter == 10 and ema_hook_of(resumed).ema.num_updates == 5
    assert_same_weights(ema_hook_of(resumed).ema.weights(), weights(first))
