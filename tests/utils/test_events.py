import datetime
import io
import json
import logging
import random
import re
import time
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from tests.engine.test_train_loop import _TransferCounter
from trainkit.utils.events import (
    CommonMetricPrinter,
    EventStorage,
    HistoryBuffer,
    JSONWriter,
    TensorboardXWriter,
    get_event_storage,
    has_event_storage,
)


def _values(storage, name):
    return [v for v, _ in storage.history(name).values()]


# ---- the current storage -------------------------------------------------------------------------------------
def test_get_event_storage_outside_a_storage_says_how_to_get_one():
    assert not has_event_storage()
    with pytest.raises(RuntimeError, match=r"outside an EventStorage.*with EventStorage\(start_iter\)"):
        get_event_storage()


def test_nested_storages_restore_the_outer_one_also_after_an_exception():
    with EventStorage() as outer:
        with pytest.raises(ZeroDivisionError):
            with EventStorage(5) as inner:
                assert get_event_storage() is inner
                1 / 0
        assert get_event_storage() is outer
    assert not has_event_storage()


# ---- lazy tensors ----------------------------------------------------------------------------------------------
def test_put_scalar_of_a_tensor_does_not_move_it_to_the_host_until_read(monkeypatch):
    with EventStorage(7) as storage:
        counter = _TransferCounter(monkeypatch, storage)
        for i in range(50):
            storage.put_scalar("loss", torch.tensor(i / 4), cur_iter=i)
        storage.put_scalar("acc", torch.tensor(0.75, dtype=torch.float16))
        assert counter.iters == []
        latest = storage.latest()
        assert len(counter.iters) == 1  # one batched transfer for all of them
    assert latest["loss"] == (12.25, 49) and type(latest["loss"][0]) is float
    assert latest["acc"] == (0.75, 7) and type(latest["acc"][0]) is float
    assert _values(storage, "loss") == [i / 4 for i in range(50)]


def test_numbers_and_tensors_keep_their_put_order():
    with EventStorage() as storage:
        for i, v in enumerate([1.0, torch.tensor(2.0), 3, torch.tensor([4.0]), 5.0]):
            storage.put_scalar("x", v, cur_iter=i)
            storage.put_scalar("y", -i)
        assert storage.history("x").values() == [(1.0, 0), (2.0, 1), (3.0, 2), (4.0, 3), (5.0, 4)]
        assert _values(storage, "y") == [0.0, -1.0, -2.0, -3.0, -4.0]
        assert storage.latest() == {"x": (5.0, 4), "y": (-4.0, 0)}


def test_put_scalar_keeps_the_value_at_put_time_when_the_tensor_changes_in_place():
    # GradScaler updates its scale tensor in place: AMPTrainer(log_grad_scaler=True) puts that very tensor.
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    with EventStorage() as storage:
        for it in range(2):
            storage.iter = it
            scaler.scale((param * float("inf")).sum()).backward()  # inf gradients: the scaler halves its scale
            storage.put_scalar("grad_scaler", scaler._get_scale_async())
            scaler.step(optimizer)
            scaler.update()
        assert storage.history("grad_scaler").values() == [(8.0, 0), (4.0, 1)]


def test_float64_and_integer_tensors_read_back_exactly():
    with EventStorage() as storage:
        storage.put_scalar("f64", torch.tensor(0.1, dtype=torch.float64))
        storage.put_scalar("tokens", torch.tensor(100_000_001))
        storage.put_scalar("bf16", torch.tensor(0.1, dtype=torch.bfloat16))
        assert storage.latest() == {"f64": (0.1, 0), "tokens": (100_000_001.0, 0), "bf16": (0.10009765625, 0)}


def test_put_scalar_rejects_a_tensor_of_several_elements():
    with EventStorage() as storage:
        with pytest.raises(ValueError, match=r"put_scalar\('w'\).*shape \(2, 3\).*\.mean\(\)"):
            storage.put_scalar("w", torch.zeros(2, 3))
        with pytest.raises(ValueError, match=r"shape \(0,\)"):
            storage.put_scalar("w", torch.zeros(0))


def test_max_pending_bounds_the_tensors_waiting_for_a_read(monkeypatch):
    with EventStorage() as storage:
        storage.MAX_PENDING = 5
        counter = _TransferCounter(monkeypatch, storage)
        for i in range(4):
            storage.put_scalar("x", torch.tensor(float(i)))
        assert counter.iters == []
        storage.put_scalar("x", torch.tensor(4.0))
        assert len(counter.iters) == 1  # the fifth pending tensor forced one batched transfer
        for i in range(5, 14):
            storage.put_scalar("x", torch.tensor(float(i)))
        assert len(counter.iters) == 2
        assert _values(storage, "x") == [float(i) for i in range(14)]


def test_max_pending_also_counts_numbers_queued_behind_a_tensor(monkeypatch):
    with EventStorage() as storage:
        storage.MAX_PENDING = 5
        counter = _TransferCounter(monkeypatch, storage)
        storage.put_scalar("loss", torch.tensor(1.0))
        for i in range(10):
            storage.put_scalar("loss", 0.1 * i)  # queued behind the tensor to keep the order of the name's values
        assert len(counter.iters) == 1


def test_a_number_reaches_the_history_at_once_while_a_tensor_of_another_name_waits(monkeypatch):
    with EventStorage() as storage:
        counter = _TransferCounter(monkeypatch, storage)
        storage.put_scalar("logit_norm", torch.tensor(3.0))
        storage.iter = 4
        storage.put_scalar("val/loss", 0.5)
        assert storage.latest_value("val/loss") == (0.5, 4)
        assert storage.changed_since("val/loss", 3) and not storage.changed_since("val/loss", 4)
        assert storage.latest_value("missing") is None and not storage.changed_since("missing", -1)
        assert counter.iters == []  # the pending tensor was not moved to the host
        assert storage.latest_value("logit_norm") == (3.0, 0)  # reading a pending name moves it
        assert len(counter.iters) == 1


# ---- bounded history -------------------------------------------------------------------------------------------
def test_history_keeps_max_history_values_and_exact_statistics():
    with EventStorage(max_history=4) as storage:
        for i, v in enumerate([5, 1, 4, 2, 3, 10]):
            storage.put_scalar("x", v, cur_iter=i)
        h = storage.history("x")
        assert h.values() == [(4.0, 2), (2.0, 3), (3.0, 4), (10.0, 5)]
        assert h.global_count() == 6
        assert h.global_avg() == 25 / 6
        assert h.latest() == 10.0
        assert h.avg(2) == 6.5 and h.avg(3) == 5.0
        assert h.median(3) == 3.0 and h.median(4) == 3.5 and h.median(100) == 3.5


def test_global_avg_is_the_mean_of_every_value_put_in_put_order():
    rng = random.Random(0)
    values = [rng.uniform(-1, 1) * 10 ** rng.randint(-3, 3) for _ in range(3000)]
    with EventStorage(max_history=10) as storage:
        for i, v in enumerate(values):
            storage.put_scalar("x", torch.tensor(v, dtype=torch.float64) if i % 3 else v)
        assert storage.history("x").global_avg() == sum(values) / len(values)
        assert _values(storage, "x") == values[-10:]


def _put_run(storage, iterations, rng):
    # Losses (tensors and numbers, smoothed) and an lr (raw) at each iteration, as a trainer puts them.
    for it in iterations:
        storage.iter = it
        loss = rng.uniform(0, 3)
        storage.put_scalar("total_loss", torch.tensor(loss, dtype=torch.float64) if it % 2 else loss)
        storage.put_scalar("lr", 0.1 / (it + 1), smoothing_hint=False)


def _statistics(storage):
    return {
        name: (h.values(), h.median(4), h.median(20), h.avg(3), h.global_avg(), h.global_count(), h.latest())
        for name, h in storage.histories().items()
    }


def test_storage_state_dict_survives_a_weights_only_checkpoint_and_continues_exactly(tmp_path):
    with EventStorage(max_history=8) as straight:  # an uninterrupted run of 30 iterations
        _put_run(straight, range(30), random.Random(0))
    rng = random.Random(0)
    with EventStorage(max_history=8) as first:  # the same run, stopped after iteration 19
        _put_run(first, range(20), rng)
        torch.save({"trainer": {"storage": first.state_dict()}}, tmp_path / "ckpt.pth")
        saved = _statistics(first)
    state = torch.load(tmp_path / "ckpt.pth", weights_only=True)["trainer"]["storage"]
    with EventStorage(start_iter=20, max_history=8) as resumed:
        resumed.load_state_dict(state)
        assert _statistics(resumed) == saved
        assert resumed.history("total_loss").global_count() == 20  # 12 values no longer kept still count
        assert resumed.smoothing_hints() == {"total_loss": True, "lr": False}
        with pytest.raises(ValueError, match="'lr' was put with smoothing_hint=False before"):
            resumed.put_scalar("lr", 0.5)  # the restored hints are enforced
        _put_run(resumed, range(20, 30), rng)
        assert _statistics(resumed) == _statistics(straight)
        assert resumed.latest_with_smoothing_hint(4) == straight.latest_with_smoothing_hint(4)


def test_history_buffer_state_dict_is_plain_data_and_round_trips():
    buf = HistoryBuffer(max_length=3)
    for i, v in enumerate([0.5, 2.0, 8.0, 1.0, 4.0]):
        buf.update(v, iteration=10 + i)
    state = buf.state_dict()
    assert state == {"values": [8.0, 1.0, 4.0], "iterations": [12, 13, 14], "count": 5, "sum": 15.5}
    copy = HistoryBuffer(max_length=3)
    copy.load_state_dict(state)
    assert (copy.values(), copy.median(3), copy.global_avg(), copy.global_count()) == (
        [(8.0, 12), (1.0, 13), (4.0, 14)], 4.0, 3.1, 5
    )


def test_history_buffer_extend_equals_updates_and_refuses_unpaired_values():
    one_by_one, at_once = HistoryBuffer(max_length=4), HistoryBuffer(max_length=4)
    values, iterations = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], list(range(20, 26))
    for v, i in zip(values, iterations):
        one_by_one.update(v, i)
    at_once.extend(values[:2], iterations[:2])
    at_once.extend(values[2:], iterations[2:])  # longer than the room left: the oldest pairs go together
    assert at_once.values() == one_by_one.values() == list(zip(values[2:], iterations[2:]))
    assert at_once.global_avg() == one_by_one.global_avg() and at_once.values_tail() == (0.6, 25)
    with pytest.raises(ValueError, match="extend\\(\\) got 2 values for 3 iterations"):
        at_once.extend([1.0, 2.0], [30, 31, 32])
    assert at_once.global_count() == 6  # nothing was added


def _train_like_puts(storage, iterations):
    # 10 scalars per iteration (tensors and numbers), read every 20 iterations as a writer would.
    for _ in range(iterations):
        for k in range(5):
            storage.put_scalar(f"loss_{k}", torch.tensor(float(k)))
        storage.put_scalars(time=0.1, data_time=0.01, lr=0.5, smoothing_hint=False)
        storage.put_scalar_series("total_loss", [1.0], [storage.iter])
        storage.put_scalar("eta_seconds", 3.0, smoothing_hint=False)
        if storage.iter % 20 == 19:
            storage.latest_with_smoothing_hint()
        storage.step()


def _traced_in_events_py():
    # Only what trainkit/utils/events.py allocated: threads other tests left behind (TensorBoard's writer
    # thread, data-loader threads) allocate too, and would make the total noisy.
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*trainkit/utils/events.py")])
    return sum(stat.size for stat in snapshot.statistics("filename"))


def test_memory_does_not_grow_with_the_number_of_iterations():
    with EventStorage() as storage:
        _train_like_puts(storage, 2000)  # fills every history (max_history=1000)
        tracemalloc.start()
        try:
            _train_like_puts(storage, 2000)
            after_4k = _traced_in_events_py()
            _train_like_puts(storage, 4000)
            after_8k = _traced_in_events_py()
        finally:
            tracemalloc.stop()
    # Unbounded histories would grow by ~10 names x 4000 values x ~100 bytes = 4 MB.
    assert after_8k - after_4k < 20_000, (after_4k, after_8k)
    assert storage.history("lr").global_count() == 8000


# ---- putting and reading -----------------------------------------------------------------------------------------
def test_latest_with_smoothing_hint_gives_medians_of_hinted_and_latest_of_the_others():
    with EventStorage() as storage:
        for i, v in enumerate([9.0, 1.0, 2.0, 8.0]):
            storage.put_scalar("loss", v, cur_iter=i)
            storage.put_scalar("lr", v, smoothing_hint=False, cur_iter=i)
        assert storage.latest_with_smoothing_hint(3) == {"loss": (2.0, 3), "lr": (8.0, 3)}
        assert storage.latest_with_smoothing_hint(20) == {"loss": (5.0, 3), "lr": (8.0, 3)}
        assert storage.latest() == {"loss": (8.0, 3), "lr": (8.0, 3)}
        assert storage.smoothing_hints() == {"loss": True, "lr": False}


def _every_other_iteration(storage):
    # "loss" is put at iterations 0, 2, ..., 38 with value = iteration; "every" at each iteration 0..39.
    for it in range(40):
        storage.iter = it
        if it % 2 == 0:
            storage.put_scalar("loss", float(it))
        storage.put_scalar("every", float(it))


def test_smoothing_takes_the_values_put_in_the_last_window_size_iterations_not_the_last_values():
    with EventStorage() as storage:
        _every_other_iteration(storage)
        # detectron2: the last 20 iterations of "loss" are 19..38, which hold its puts at 20, 22, ..., 38.
        assert storage.count_samples("loss", 20) == 10
        assert storage.count_samples("every", 20) == 20
        assert storage.count_samples("loss", 3) == 2  # iterations 36..38: the puts at 36 and 38
        smoothed = storage.latest_with_smoothing_hint(20)
        assert smoothed["loss"] == (29.0, 38)  # median of 20, 22, ..., 38 (the last 20 values would give 19.0)
        assert smoothed["every"] == (29.5, 39)  # median of 20..39
        with pytest.raises(KeyError, match="No history metric available for 'nothing'"):
            storage.count_samples("nothing")


def test_writers_smooth_a_metric_put_every_other_iteration_over_window_size_iterations(tmp_path):
    with EventStorage() as storage:
        _every_other_iteration(storage)
        json_writer = JSONWriter(str(tmp_path / "metrics.json"), window_size=20)
        tb_writer = TensorboardXWriter(str(tmp_path / "tb"), window_size=20)
        json_writer.write()
        tb_writer.write()
        json_writer.close()
        tb_writer.close()
    lines = _read_json_lines(tmp_path / "metrics.json")
    assert [line for line in lines if "loss" in line] == [{"iteration": 38, "loss": 29.0}]
    assert [(e.step, e.value) for e in _load_tensorboard(tmp_path / "tb").Scalars("loss")] == [(38, 29.0)]


def test_a_name_must_keep_its_smoothing_hint():
    with EventStorage() as storage:
        storage.put_scalar("lr", 0.1, smoothing_hint=False)
        with pytest.raises(ValueError, match=r"'lr'.*smoothing_hint=False before and smoothing_hint=True now"):
            storage.put_scalar("lr", 0.2)
        with pytest.raises(ValueError, match="'lr'"):
            storage.put_scalar_series("lr", [0.3], [1])
        assert storage.history("lr").values() == [(0.1, 0)]


def test_put_scalars_puts_each_keyword_at_the_given_iteration():
    with EventStorage(3) as storage:
        storage.put_scalars(a=1, b=torch.tensor(2.0), smoothing_hint=False, cur_iter=10)
        storage.put_scalars(a=3, smoothing_hint=False)
        assert storage.latest() == {"a": (3.0, 3), "b": (2.0, 10)}
        assert storage.smoothing_hints() == {"a": False, "b": False}


@pytest.mark.parametrize("tensor_pending", [False, True])
def test_put_scalar_series_equals_put_scalar_one_by_one(tensor_pending):
    values, iters = [3.0, 1.0, 4.0, 1.5, 9.0], [10, 11, 12, 13, 14]
    storages = []
    for by_series in (False, True):
        with EventStorage(max_history=3) as storage:
            if tensor_pending:
                storage.put_scalar("other", torch.tensor(7.0))
            with storage.name_scope("train"):
                if by_series:
                    storage.put_scalar_series("loss", values, iters)
                else:
                    for v, it in zip(values, iters):
                        storage.put_scalar("loss", v, cur_iter=it)
            storages.append(storage)
    a, b = (s.history("train/loss") for s in storages)
    assert a.values() == b.values() == [(4.0, 12), (1.5, 13), (9.0, 14)]
    assert a.global_avg() == b.global_avg() == 18.5 / 5
    assert storages[0].latest() == storages[1].latest()


def test_name_scope_prefixes_nested_names_and_restores_after_an_exception():
    with EventStorage() as storage:
        with storage.name_scope("val"):
            storage.put_scalar("acc", 0.5)
            with pytest.raises(KeyError):
                with storage.name_scope("top5/"):
                    storage.put_scalar("acc", 0.9)
                    raise KeyError("boom")
            storage.put_scalar("loss", 1.0)
        storage.put_scalar("lr", 0.1)
        assert sorted(storage.latest()) == ["lr", "val/acc", "val/loss", "val/top5/acc"]


def test_iter_setter_step_and_the_iteration_alias():
    with EventStorage(start_iter=4) as storage:
        assert storage.iter == storage.iteration == storage.start_iter == 4
        storage.step()
        storage.put_scalar("x", 1.0)
        storage.iter = 10.0
        assert storage.iter == 10 and type(storage.iter) is int
        storage.put_scalar("y", 2.0)
        assert storage.latest() == {"x": (1.0, 5), "y": (2.0, 10)}


def test_history_of_an_unknown_name_lists_the_known_names():
    with EventStorage() as storage:
        storage.put_scalars(loss=1.0, lr=0.1)
        with pytest.raises(KeyError, match=r"'los'.*\['loss', 'lr'\]"):
            storage.history("los")


# ---- JSONWriter ------------------------------------------------------------------------------------------------------
def _read_json_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_json_writer_writes_each_iteration_once_with_smoothed_and_raw_values(tmp_path):
    path = tmp_path / "metrics.json"
    with EventStorage() as storage:
        writer = JSONWriter(str(path), window_size=4)
        for it in range(10):
            storage.put_scalar("loss", float(it * it), cur_iter=it)
            storage.put_scalar("lr", 1.0 / (it + 1), smoothing_hint=False, cur_iter=it)
        writer.write()
        writer.write()  # nothing new
        storage.put_scalar("val/acc", 0.5, smoothing_hint=False, cur_iter=14)
        for it in range(10, 20):
            storage.put_scalar("loss", float(it * it), cur_iter=it)
        writer.write()
        writer.write()
        writer.close()
    assert _read_json_lines(path) == [
        {"iteration": 9, "loss": (49 + 64) / 2, "lr": 0.1},  # median of 36, 49, 64, 81
        {"iteration": 14, "val/acc": 0.5},
        {"iteration": 19, "loss": (17 * 17 + 18 * 18) / 2},
    ]


def test_json_writer_appends_to_an_existing_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"iteration": 3, "loss": 2.0}\n')
    with EventStorage(start_iter=4) as storage:
        writer = JSONWriter(str(path))
        storage.put_scalar("loss", torch.tensor(1.5))
        writer.write()
        writer.close()
    assert _read_json_lines(path) == [{"iteration": 3, "loss": 2.0}, {"iteration": 4, "loss": 1.5}]


def _write_iterations(path, start_iter, iterations):
    # A run that starts (or resumes) at start_iter and writes `loss = iteration` at each given iteration.
    with EventStorage(start_iter=start_iter) as storage:
        writer = JSONWriter(str(path), window_size=1)
        for it in iterations:
            storage.put_scalar("loss", float(it), cur_iter=it)
            writer.write()
        writer.close()


_OLD_RUN = (
    '{"iteration": 9, "loss": 9.0}\n'
    '{"iteration": 19, "loss": 19.0}\n'
    '{"iteration": 19, "val/acc": 0.5}\n'
    '{"iteration": 29, "loss": 29.0}\n'
    '{"iteration": 39, "loss": 39.0}\n'
)


def test_json_writer_resuming_drops_the_lines_of_iterations_from_start_iter_on(tmp_path):
    # The interrupted run wrote up to 39, but its last checkpoint was at 19: the resumed run starts at 20.
    path = tmp_path / "metrics.json"
    path.write_text(_OLD_RUN)
    _write_iterations(path, 20, [20, 25, 29])
    assert path.read_text().splitlines()[:3] == _OLD_RUN.splitlines()[:3]  # kept lines are untouched
    assert [(m["iteration"], m.get("loss")) for m in _read_json_lines(path)] == [
        (9, 9.0), (19, 19.0), (19, None), (20, 20.0), (25, 25.0), (29, 29.0)
    ]
    assert list(tmp_path.iterdir()) == [path]  # no .bak, no leftover temporary file


def test_json_writer_resuming_after_the_last_written_iteration_leaves_the_file_as_it_was(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(_OLD_RUN)
    inode = path.stat().st_ino
    _write_iterations(path, 40, [49])
    assert path.read_text() == _OLD_RUN + '{"iteration": 49, "loss": 49.0}\n'
    assert path.stat().st_ino == inode  # appended to, not rewritten


@pytest.mark.parametrize("cut", ['{"iteration": 29, "lo', '{"iteration": 29, "loss": 29.0', "{"])
def test_json_writer_resuming_drops_a_line_cut_short_by_a_crash(tmp_path, cut):
    path = tmp_path / "metrics.json"
    path.write_text('{"iteration": 9, "loss": 9.0}\n{"iteration": 19, "loss": 19.0}\n' + cut)
    _write_iterations(path, 30, [39])
    assert path.read_text() == (
        '{"iteration": 9, "loss": 9.0}\n{"iteration": 19, "loss": 19.0}\n{"iteration": 39, "loss": 39.0}\n'
    )


def test_json_writer_resuming_after_a_whole_line_without_its_newline_keeps_the_lines_apart(tmp_path):
    # Killed between the last "}" and its "\n": a line of a superseded iteration is dropped like any other;
    # a whole line of an earlier iteration is complete data, kept, and ended so that new lines start on
    # their own line.
    path = tmp_path / "metrics.json"
    path.write_text('{"iteration": 9, "loss": 9.0}\n{"iteration": 19, "loss": 19.0}')
    _write_iterations(path, 10, [10])
    assert path.read_text() == '{"iteration": 9, "loss": 9.0}\n{"iteration": 10, "loss": 10.0}\n'

    path.write_text('{"iteration": 9, "loss": 9.0}\n{"iteration": 19, "loss": 19.0}')
    _write_iterations(path, 20, [29])
    assert path.read_text() == (
        '{"iteration": 9, "loss": 9.0}\n{"iteration": 19, "loss": 19.0}\n{"iteration": 29, "loss": 29.0}\n'
    )


def test_json_writer_starting_at_iteration_0_moves_an_old_file_to_a_numbered_bak(tmp_path):
    path = tmp_path / "metrics.json"
    old = _OLD_RUN.encode() + b'{"iteration": 49, "lo'  # any bytes, even a partial line, are preserved
    path.write_bytes(old)
    _write_iterations(path, 0, [0, 9])
    assert (tmp_path / "metrics.json.1.bak").read_bytes() == old
    assert path.read_text() == '{"iteration": 0, "loss": 0.0}\n{"iteration": 9, "loss": 9.0}\n'

    _write_iterations(path, 0, [4])  # a third run from scratch: the second run's file becomes .2.bak
    assert (tmp_path / "metrics.json.1.bak").read_bytes() == old
    assert (tmp_path / "metrics.json.2.bak").read_text() == (
        '{"iteration": 0, "loss": 0.0}\n{"iteration": 9, "loss": 9.0}\n'
    )
    assert path.read_text() == '{"iteration": 4, "loss": 4.0}\n'


def test_json_writer_starting_at_iteration_0_over_an_empty_file_makes_no_bak(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("")
    _write_iterations(path, 0, [0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    assert path.read_text() == '{"iteration": 0, "loss": 0.0}\n'


def test_json_writer_touches_no_file_before_its_first_write(tmp_path):
    # A run that fails before its first write leaves the previous run's metrics where they were.
    path = tmp_path / "metrics.json"
    path.write_text(_OLD_RUN)
    with EventStorage(start_iter=0):
        JSONWriter(str(path)).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"] and path.read_text() == _OLD_RUN


# ---- TensorboardXWriter -----------------------------------------------------------------------------------------------
def _load_tensorboard(log_dir):
    guidance = {
        event_accumulator.SCALARS: 0,
        event_accumulator.IMAGES: 0,
        event_accumulator.HISTOGRAMS: 0,
        event_accumulator.COMPRESSED_HISTOGRAMS: 0,
        event_accumulator.TENSORS: 0,
        event_accumulator.AUDIO: 0,
    }
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance=guidance)
    acc.Reload()
    return acc


def test_tensorboard_writer_writes_scalars_at_their_iterations(tmp_path):
    with EventStorage() as storage:
        writer = TensorboardXWriter(str(tmp_path), window_size=2)
        for it in range(6):
            storage.put_scalar("loss", float(2 ** it), cur_iter=it)
            storage.put_scalar("lr", 0.5 / (it + 1), smoothing_hint=False, cur_iter=it)
            if it % 3 == 2:
                writer.write()
        writer.write()
        writer.close()
    acc = _load_tensorboard(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(2, 3.0), (5, 24.0)]  # medians of 2 values
    assert [(e.step, e.value) for e in acc.Scalars("lr")] == [(2, pytest.approx(0.5 / 3)), (5, pytest.approx(0.5 / 6))]


def test_tensorboard_writer_creates_no_file_until_something_is_written(tmp_path):
    log_dir = tmp_path / "tb"
    with EventStorage():
        writer = TensorboardXWriter(str(log_dir))
        writer.write()  # nothing put yet
        assert not log_dir.exists()
        writer.close()
    assert not log_dir.exists()


def test_tensorboard_writer_underlying_writer_is_created_lazily_and_can_be_written_to(tmp_path):
    log_dir = tmp_path / "tb"
    writer = TensorboardXWriter(str(log_dir), window_size=1)
    assert not log_dir.exists()
    writer._writer.add_scalar("custom", 7.0, 3)  # detectron2 users write to the SummaryWriter directly
    assert len(list(log_dir.iterdir())) == 1
    with EventStorage(start_iter=0) as storage:
        storage.put_scalar("loss", 2.0, cur_iter=4)
        writer.write()  # the same SummaryWriter, the same file
    writer.close()
    acc = _load_tensorboard(log_dir)
    assert [(e.step, e.value) for e in acc.Scalars("custom")] == [(3, 7.0)]
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(4, 2.0)]
    assert len(list(log_dir.iterdir())) == 1


def test_tensorboard_writer_images_and_histograms_are_read_through_the_public_api(tmp_path):
    with EventStorage() as storage:
        storage.put_image("img", torch.zeros(3, 2, 2))
        storage.put_histogram("weights", torch.arange(4.0), bins=2)
        assert [name for name, _, _ in storage.images()] == ["img"]
        assert [h["tag"] for h in storage.histograms()] == ["weights"]
        TensorboardXWriter(str(tmp_path)).write()
        assert storage.images() == [] and storage.histograms() == []


def test_tensorboard_writer_writes_images_and_histograms_once(tmp_path):
    image = (torch.arange(24, dtype=torch.uint8) * 10).reshape(3, 2, 4)
    with EventStorage(start_iter=8) as storage:
        writer = TensorboardXWriter(str(tmp_path))
        storage.put_image("dropped", torch.zeros(3, 2, 2))
        storage.put_histogram("dropped_hist", torch.ones(4))
        storage.clear_images()
        storage.clear_histograms()
        with storage.name_scope("input"):
            storage.put_image("sample", image)
            storage.put_histogram("pixels", torch.tensor([[0.0, 1.0, 1.0], [2.0, 3.0, 0.5]]), bins=3)
        writer.write()
        storage.step()
        writer.write()  # the images and histograms were written once and cleared
        writer.close()
    acc = _load_tensorboard(tmp_path)
    tags = acc.Tags()
    assert tags["images"] == ["input/sample"] and tags["histograms"] == ["input/pixels"]
    [img] = acc.Images("input/sample")
    assert (img.step, img.width, img.height) == (8, 4, 2)
    pixels = np.asarray(Image.open(io.BytesIO(img.encoded_image_string)))
    assert np.array_equal(pixels, image.permute(1, 2, 0).numpy())
    [hist] = acc.Histograms("input/pixels")
    h = hist.histogram_value
    assert hist.step == 8
    assert (h.min, h.max, h.num, h.sum, h.sum_squares) == (0.0, 3.0, 6, 7.5, 15.25)
    assert list(h.bucket_limit) == [1.0, 2.0, 3.0] and list(h.bucket) == [2.0, 2.0, 2.0]


def _tensorboard_run(log_dir, start_iter, iterations, offset):
    # One run: `loss = offset + iteration` written at every iteration.
    with EventStorage(start_iter=start_iter) as storage:
        writer = TensorboardXWriter(str(log_dir), window_size=1)
        for it in iterations:
            storage.put_scalar("loss", float(offset + it), cur_iter=it)
            writer.write()
        writer.close()


def test_tensorboard_writer_resuming_hides_the_steps_the_interrupted_run_wrote_after_start_iter(tmp_path):
    _tensorboard_run(tmp_path, 0, range(10), offset=0)  # wrote 0..9, but its last checkpoint was at 4
    _tensorboard_run(tmp_path, 5, range(5, 8), offset=100)  # the resumed run
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    acc = _load_tensorboard(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [
        (0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 105.0), (6, 106.0), (7, 107.0)
    ]


def test_tensorboard_event_file_cut_short_by_a_kill_reads_up_to_its_last_whole_record(tmp_path):
    _tensorboard_run(tmp_path, 0, range(10), offset=0)
    [events_file] = tmp_path.glob("events.out.tfevents.*")
    events_file.write_bytes(events_file.read_bytes()[:-7])  # the last record (step 9) loses its tail
    assert [e.step for e in _load_tensorboard(tmp_path).Scalars("loss")] == list(range(9))


def test_tensorboard_writer_starting_at_0_does_not_purge(tmp_path):
    # Without purge_step (start_iter 0) TensorBoard keeps both runs' points: a fresh run belongs in a new folder.
    _tensorboard_run(tmp_path, 0, range(3), offset=0)
    _tensorboard_run(tmp_path, 0, range(2), offset=100)
    steps = sorted(e.step for e in _load_tensorboard(tmp_path).Scalars("loss"))
    assert steps == [0, 0, 1, 1, 2]


# ---- CommonMetricPrinter ---------------------------------------------------------------------------------------------
@pytest.fixture
def trainkit_info_logs(caplog, monkeypatch):
    """caplog at INFO for trainkit's loggers, also after setup_logger() turned their propagation off."""
    monkeypatch.setattr(logging.getLogger("trainkit"), "propagate", True)
    caplog.set_level(logging.INFO, logger="trainkit")
    return caplog


def _printed(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "trainkit.utils.events"]


def test_common_metric_printer_logs_eta_iteration_losses_times_and_lr_in_one_line(trainkit_info_logs):
    caplog = trainkit_info_logs
    with EventStorage() as storage:
        for it in range(20):
            storage.iter = it
            storage.put_scalars(loss_cls=1.0 + it, loss_box=0.25)
            storage.put_scalars(time=2.0, data_time=0.5 if it < 10 else 0.25)
            storage.put_scalar("lr", 0.1 / (it + 1), smoothing_hint=False)
        printer = CommonMetricPrinter(max_iter=100, window_size=5)
        printer.write()
        eta_seconds = storage.history("eta_seconds").latest()
        storage.iter = 100
        printer.write()  # training has ended: nothing new to print
    [line] = _printed(caplog)
    assert eta_seconds == 160.0  # (100 - 19 - 1) remaining iterations x 2.0 s
    assert line.split() == (
        "eta: 0:02:40 iter: 19 loss_cls: 18 loss_box: 0.25 time: 2.0000 data_time: 0.2500 lr: 0.005".split()
    )


def test_common_metric_printer_without_time_estimates_eta_from_wall_time(trainkit_info_logs):
    caplog = trainkit_info_logs
    with EventStorage(start_iter=9) as storage:
        printer = CommonMetricPrinter(max_iter=10_010)
        storage.put_scalar("loss", 1.0)
        printer.write()
        time.sleep(0.2)
        storage.iter = 19
        storage.put_scalar("loss", 2.0)
        printer.write()
    first, second = _printed(caplog)
    assert "eta" not in first and first.split()[:2] == ["iter:", "9"]
    eta = re.match(r"eta: (\d+):(\d\d):(\d\d)  iter: 19  loss: 1\.5", second.strip())
    assert eta, second
    seconds = datetime.timedelta(hours=int(eta[1]), minutes=int(eta[2]), seconds=int(eta[3])).total_seconds()
    # 0.2 s or more for 10 iterations, 9990 iterations to go
    assert 199 <= seconds < 400


def test_common_metric_printer_max_iter_is_optional_and_then_prints_no_eta(trainkit_info_logs):
    caplog = trainkit_info_logs
    with EventStorage() as storage:
        for it in range(5):
            storage.iter = it
            storage.put_scalars(loss=1.0, time=0.5)
        printer = CommonMetricPrinter()
        assert printer.logger is logging.getLogger("trainkit.utils.events")
        printer.write()
    [line] = _printed(caplog)
    assert line.split() == "iter: 4 loss: 1 time: 0.5000".split()


def test_common_metric_printer_logs_through_its_logger_attribute(caplog):
    other = logging.getLogger("my_project.metrics")
    caplog.set_level(logging.INFO, logger="my_project.metrics")
    with EventStorage() as storage:
        storage.put_scalar("loss", 3.0)
        printer = CommonMetricPrinter(max_iter=None)
        printer.logger = other
        printer.write()
    assert [r.getMessage().split() for r in caplog.records if r.name == "my_project.metrics"] == [
        "iter: 0 loss: 3".split()
    ]


def test_common_metric_printer_smooths_over_window_size_iterations(trainkit_info_logs):
    caplog = trainkit_info_logs
    with EventStorage() as storage:
        for it in range(40):
            storage.iter = it
            if it % 2 == 0:
                storage.put_scalars(loss=float(it), data_time=float(it))
            storage.put_scalar("time", float(it))
        storage.iter = 39
        CommonMetricPrinter(window_size=20).write()
    [line] = _printed(caplog)
    # loss: median of its puts at 20..38 (29); data_time: their mean (29); time: the mean of 20..39 (29.5).
    assert line.split() == "iter: 39 loss: 29 time: 29.5000 data_time: 29.0000".split()
