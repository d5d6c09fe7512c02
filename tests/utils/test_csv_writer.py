import csv
import os

import pytest

from tests.engine.digits_runs import digits_cfg, read_metrics, train
from tests.engine.test_hooks import FailAt
from trainkit.utils.events import CSVWriter, EventStorage


def read_rows(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def _write(writer, storage, iterations, **extra_at):
    # Puts `loss = iteration` at each iteration (and each name of extra_at at its iteration), writing each time.
    for it in iterations:
        storage.iter = it
        storage.put_scalar("loss", float(it), smoothing_hint=False)
        for name, at in extra_at.items():
            if it == at:
                storage.put_scalar(name, 100.0 + it, smoothing_hint=False)
        writer.write()


def test_csv_writer_writes_a_row_per_iteration_and_a_column_that_appears_later(tmp_path):
    path = tmp_path / "metrics.csv"
    writer = CSVWriter(str(path))
    with EventStorage(0) as storage:
        _write(writer, storage, range(3))
        inode, size = os.stat(path).st_ino, os.path.getsize(path)
        _write(writer, storage, range(3, 5), **{"eval/top1": 4})
        _write(writer, storage, range(5, 7))
    writer.close()
    header, rows = read_rows(path)
    assert header == ["iteration", "eval/top1", "loss"]
    assert [(r["iteration"], r["loss"], r["eval/top1"]) for r in rows] == [
        ("0", "0.0", ""), ("1", "1.0", ""), ("2", "2.0", ""), ("3", "3.0", ""), ("4", "4.0", "104.0"),
        ("5", "5.0", ""), ("6", "6.0", ""),
    ]
    assert os.stat(path).st_ino != inode  # the new column was written with a new header, once
    assert path.read_text().startswith("iteration,eval/top1,loss\n0,,0.0\n") and size == len("iteration,loss\n0,0.0\n1,1.0\n2,2.0\n")


def test_csv_writer_appends_when_no_new_column_appears(tmp_path):
    path = tmp_path / "metrics.csv"
    writer = CSVWriter(str(path))
    with EventStorage(0) as storage:
        _write(writer, storage, range(2))
        before, inode = path.read_bytes(), os.stat(path).st_ino
        _write(writer, storage, range(2, 4))
    assert os.stat(path).st_ino == inode and path.read_bytes().startswith(before)
    assert path.read_bytes()[len(before):] == b"2,2.0\n3,3.0\n"


def test_csv_writer_resuming_drops_rows_after_the_kept_iteration_and_a_row_cut_short(tmp_path):
    path = tmp_path / "metrics.csv"
    writer = CSVWriter(str(path))
    with EventStorage(0) as storage:
        _write(writer, storage, range(6), **{"eval/top1": 2})
    writer.close()
    with open(path, "a") as f:
        f.write("6,,6.")  # a kill in the middle of a row
    resumed = CSVWriter(str(path))
    resumed.continue_after(3)  # the interrupted run's last write before its checkpoint
    with EventStorage(4) as storage:
        _write(resumed, storage, range(4, 6))
    header, rows = read_rows(path)
    assert header == ["iteration", "eval/top1", "loss"]
    assert [(r["iteration"], r["loss"], r["eval/top1"]) for r in rows] == [
        ("0", "0.0", ""), ("1", "1.0", ""), ("2", "2.0", "102.0"), ("3", "3.0", ""), ("4", "4.0", ""), ("5", "5.0", ""),
    ]


def test_csv_writer_starting_at_iteration_0_moves_an_old_file_to_a_numbered_bak(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("iteration,loss\n0,9.0\n")
    writer = CSVWriter(str(path))
    with EventStorage(0) as storage:
        _write(writer, storage, range(1))
    assert (tmp_path / "metrics.csv.1.bak").read_text() == "iteration,loss\n0,9.0\n"
    assert read_rows(path)[1] == [{"iteration": "0", "loss": "0.0"}]


def test_csv_of_an_interrupted_and_resumed_trainer_has_each_iteration_once_as_metrics_json(tmp_path):
    # The interrupted run wrote rows 24 and 29 after its last checkpoint (19); the evaluations at 9 and 19 add
    # their columns after the first rows.
    opts = ["SOLVER.MAX_ITER", "40", "SOLVER.LOG_PERIOD", "5", "TEST.EVAL_PERIOD", "10", "WRITERS", '["json", "csv"]']
    cfg = digits_cfg(tmp_path, *opts)
    with pytest.raises(RuntimeError, match="failed at 32"):
        train(cfg, extra_hooks=[FailAt(32)])
    assert [r["iteration"] for r in read_rows(tmp_path / "metrics.csv")[1]][-2:] == ["29", "32"]
    train(cfg, resume=True)
    header, rows = read_rows(tmp_path / "metrics.csv")
    metrics = read_metrics(tmp_path)
    assert [int(r["iteration"]) for r in rows] == [m["iteration"] for m in metrics] == list(range(4, 40, 5))
    assert {"classification/top1", "classification/top5", "total_loss", "lr"} <= set(header)
    assert set(header) == {"iteration"} | {k for m in metrics for k in m}
    for row, line in zip(rows, metrics):  # the same values as metrics.json, in every cell that has one
        assert {k: float(v) for k, v in row.items() if v != ""} == {k: float(v) for k, v in line.items()}
