"""LossLog: each iteration's losses kept as tensors, put into the storage at a flush with one transfer."""
import pytest
import torch

from tests.engine.test_train_loop import _TransferCounter
from trainkit.engine.loss_log import LossLog
from trainkit.utils.events import EventStorage


class _Iter:
    iter = -1


def _record(log, it, **losses):
    loss_dict = {k: torch.tensor(v) for k, v in losses.items()}
    log.record(it, loss_dict, sum(loss_dict.values()), data_time=0.25 * it)


def test_record_keeps_tensors_and_flush_puts_every_iteration_with_one_transfer(monkeypatch):
    log = LossLog()
    with EventStorage() as storage:
        counter = _TransferCounter(monkeypatch, _Iter())
        for it in range(3):
            _record(log, it, loss_a=1.0 + it, loss_b=0.5)
        assert counter.iters == [] and storage.histories() == {}
        log.flush()
        assert len(counter.iters) == 1
        assert storage.history("loss_a").values() == [(1.0, 0), (2.0, 1), (3.0, 2)]
        assert storage.history("total_loss").values() == [(1.5, 0), (2.5, 1), (3.5, 2)]
        assert storage.history("data_time").values() == [(0.0, 0), (0.25, 1), (0.5, 2)]
        log.flush()  # nothing recorded since: nothing put again
        assert storage.history("loss_a").global_count() == 3


def test_a_single_loss_is_also_the_total_loss():
    log = LossLog()
    with EventStorage() as storage:
        _record(log, 0, loss_cls=2.0)
        log.flush()
        assert storage.history("loss_cls").values() == storage.history("total_loss").values() == [(2.0, 0)]


def test_other_loss_names_flush_what_was_recorded_first():
    log = LossLog()
    with EventStorage() as storage:
        _record(log, 0, loss_a=1.0)
        _record(log, 1, loss_b=2.0)  # the model changed its losses: iteration 0 goes to the storage now
        assert storage.history("loss_a").values() == [(1.0, 0)]
        assert "loss_b" not in storage.histories()
        log.flush()
        assert storage.history("total_loss").values() == [(1.0, 0), (2.0, 1)]


def test_a_non_finite_total_names_the_first_bad_iteration_and_keeps_the_ones_before():
    log = LossLog()
    with EventStorage() as storage:
        _record(log, 5, loss_a=1.0, loss_b=1.0)
        _record(log, 6, loss_a=float("nan"), loss_b=1.0)
        _record(log, 7, loss_a=float("inf"), loss_b=1.0)
        with pytest.raises(FloatingPointError, match=r"iteration=6!\nloss_dict = \{'loss_a': nan, 'loss_b': 1.0"):
            log.flush()
        assert storage.history("total_loss").values() == [(2.0, 5)]
        log.flush()  # the bad iterations are not kept: no second error
