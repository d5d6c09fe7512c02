"""What does one write of a log period cost, per writer, against writing the same values by hand?

One log period: ``--names`` scalars put at each of ``--period`` iterations; a write sends the latest value of
each (one row). Each row of the output times one write (median over ``--repeats`` periods), side by side with
a hand-written write of the same row in the same process:

* ``mlflow``: trainkit's MLflowWriter (one ``log_batch``) against the hand-written ``log_metric`` per value
  (what a training script usually does), and against a hand-written single ``log_batch``.
* ``csv`` and ``json``: CSVWriter and JSONWriter against ``csv.writer`` / ``json.dumps`` of the raw values
  and a flush.

Both sides log to a fresh SQLite store / file in a temporary folder.

Usage: ``python benchmarks/writers.py [--names 10] [--period 20] [--repeats 15] [--skip-mlflow]``
"""
import argparse
import csv
import json
import os
import statistics
import tempfile
import time
from typing import Callable, Dict, List

from trainkit.utils.events import CSVWriter, EventStorage, JSONWriter

Rows = Dict[int, Dict[str, float]]


def _period(storage: EventStorage, start: int, period: int, names: int) -> Rows:
    # Puts one period's values (as the trainer and hooks do). A write sends each name's latest value (one
    # row per period, as detectron2's writers do): the hand-written side gets that row.
    for it in range(start, start + period):
        storage.iter = it
        row = {f"metric_{k}": 1.0 / (it + k + 1) for k in range(names)}
        for name, value in row.items():
            storage.put_scalar(name, value, smoothing_hint=False)
    return {start + period - 1: row}


def _time(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _compare(label: str, writer_write: Callable[[], None], hand: Dict[str, Callable[[Rows], None]], args) -> None:
    times: Dict[str, List[float]] = {"trainkit": [], **{k: [] for k in hand}}
    with EventStorage(0) as storage:
        for r in range(args.repeats + 1):  # the first period opens files and stores: not timed
            rows = _period(storage, r * args.period, args.period, args.names)
            spent = {"trainkit": _time(writer_write), **{k: _time(lambda f=f: f(rows)) for k, f in hand.items()}}
            if r:
                for k, v in spent.items():
                    times[k].append(v)
    ours = statistics.median(times["trainkit"]) * 1e6
    for k in hand:
        theirs = statistics.median(times[k]) * 1e6
        print(f"{label:7s} {k:28s} {theirs:11.1f} {ours:11.1f} {ours / theirs:7.3f}")


def _file_rows(folder: str, args) -> None:
    json_path, csv_path = os.path.join(folder, "hand.json"), os.path.join(folder, "hand.csv")
    jf, cf = open(json_path, "a"), open(csv_path, "a", newline="")
    names = ["iteration"] + [f"metric_{k}" for k in range(args.names)]
    cw = csv.DictWriter(cf, fieldnames=names, lineterminator="\n")

    def hand_json(rows: Rows) -> None:
        jf.write("".join(json.dumps({**v, "iteration": it}, sort_keys=True) + "\n" for it, v in rows.items()))
        jf.flush()

    def hand_csv(rows: Rows) -> None:
        cw.writerows({**v, "iteration": it} for it, v in rows.items())
        cf.flush()

    json_writer, csv_writer = JSONWriter(os.path.join(folder, "m.json")), CSVWriter(os.path.join(folder, "m.csv"))
    _compare("json", json_writer.write, {"json.dumps lines + flush": hand_json}, args)
    _compare("csv", csv_writer.write, {"csv.DictWriter rows + flush": hand_csv}, args)
    for f in (jf, cf, json_writer, csv_writer):
        f.close()


def _mlflow_rows(folder: str, args) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from trainkit.utils.trackers import MLflowWriter

    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("hand", artifact_location=f"file://{folder}/mlartifacts")
    run_each, run_batch = (client.create_run(experiment).info.run_id for _ in range(2))

    def log_metric_each(rows: Rows) -> None:
        for it, values in rows.items():
            for name, value in values.items():
                client.log_metric(run_each, name, value, step=it)

    def log_batch_once(rows: Rows) -> None:
        now = int(time.time() * 1000)
        client.log_batch(run_batch, metrics=[Metric(n, v, now, it) for it, vs in rows.items() for n, v in vs.items()])

    writer = MLflowWriter(folder, experiment_name="trainkit", tracking_uri=uri)
    _compare("mlflow", writer.write, {"log_metric per value": log_metric_each, "one log_batch": log_batch_once}, args)
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--names", type=int, default=10)
    parser.add_argument("--period", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--skip-mlflow", action="store_true")
    args = parser.parse_args()
    print(f"one write of {args.period} iterations x {args.names} scalars, median of {args.repeats} (us)")
    print(f"{'writer':7s} {'hand-written':28s} {'hand':>11s} {'trainkit':>11s} {'ratio':>7s}")
    with tempfile.TemporaryDirectory() as folder:
        _file_rows(folder, args)
        if not args.skip_mlflow:
            _mlflow_rows(folder, args)


if __name__ == "__main__":
    main()
