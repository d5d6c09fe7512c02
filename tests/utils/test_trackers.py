"""MLflowWriter and WandbWriter against the real packages: a real SQLite MLflow store read back with
MlflowClient, and W&B's offline run files read record by record with W&B's own protobuf messages."""
import glob
import importlib.util
import json
import os
import struct
import sys
from datetime import timedelta

import pytest

from tests.engine.digits_runs import CONSTANT_LR, MEASUREMENTS, digits_cfg, read_metrics, train
from tests.engine.test_hooks import FailAt
from trainkit.engine import launch
from trainkit.utils import comm
from trainkit.utils.events import EventStorage
from trainkit.utils.trackers import MLflowWriter, WandbWriter, flatten_config



def _needs(package):
    # Skip only where the package is really missing; CI installs the test extra, so there it must be present.
    if importlib.util.find_spec(package) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{package} is not installed; the test extra (pip install -e '.[test]') installs it")
        pytest.skip(f"{package} is not installed (pip install -e '.[test]')")


def _series(metrics, key):
    return [(m["iteration"], m[key]) for m in metrics if key in m]


# ---- MLflow ------------------------------------------------------------------------------------------------
def test_mlflow_run_interrupted_and_resumed_holds_params_each_step_once_and_artifacts(tmp_path, monkeypatch):
    _needs("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = digits_cfg(tmp_path, "SOLVER.MAX_ITER", "40", "SOLVER.LOG_PERIOD", "5", "TEST.EVAL_PERIOD", "10",
                     "WRITERS", '["json", "mlflow"]')
    # The interrupted run logs steps 24 and 29 (and 32, at the end) after its last checkpoint (19).
    with pytest.raises(RuntimeError, match="failed at 32"):
        train(cfg, extra_hooks=[FailAt(32)])
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("trainkit")
    assert [r.info.status for r in client.search_runs([experiment.experiment_id])] == ["FAILED"]
    _, results = train(cfg, resume=True)

    (run,) = client.search_runs([experiment.experiment_id])  # the resumed run continued the same MLflow run
    assert run.info.status == "FINISHED"
    assert run.data.params == flatten_config(cfg) and run.data.params["SOLVER.BASE_LR"] == "0.1"
    metrics = read_metrics(tmp_path)
    keys = {k for m in metrics for k in m} - {"iteration"}
    assert set(run.data.metrics) == keys
    for key in keys:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        steps = [s for s, _ in history]
        expected = _series(metrics, key)
        assert len(steps) == len(set(steps)), key  # each step once
        # Step 32 is the interrupted run's last write; MLflow cannot delete it (the resumed run writes 34 next).
        assert [s for s in steps if s != 32] == [i for i, _ in expected], key
        if key not in MEASUREMENTS:  # wall-clock and memory: an interrupted and a resumed run differ
            assert [p for p in history if p[0] != 32] == expected, key
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"config.yaml", "config.resumed_at_20.yaml", "final_evaluation.json"}
    folder = tmp_path / "mlartifacts" / run.info.run_id / "artifacts"
    assert (folder / "config.yaml").read_text() == cfg.dump()
    assert json.loads((folder / "final_evaluation.json").read_text()) == results


@pytest.fixture(scope="module")
def team_store(tmp_path_factory):
    """A SQLite store shared by the tests below (a new store costs seconds: MLflow migrates its schema)."""
    _needs("mlflow")
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/team.db"


def test_mlflow_writer_logs_to_mlflow_tracking_uri_when_set(tmp_path, monkeypatch, team_store):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow puts the artifacts of a store it was given in ./mlruns
    uri = team_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    writer = MLflowWriter(str(tmp_path / "out"), config={"SOLVER": {"BASE_LR": 0.5}}, experiment_name="e")
    with EventStorage(0) as storage:
        for it in range(3):
            storage.iter = it
            storage.put_scalar("loss", 1.0 / (it + 1), smoothing_hint=False)
            storage.put_scalar("top@1 (%)", 50.0 + it, smoothing_hint=False)  # characters MLflow refuses
            writer.write()
        writer.close()
    assert writer.tracking_uri == uri and not (tmp_path / "out" / "mlflow.db").exists()
    run = MlflowClient(uri).get_run(writer.run_id)
    assert run.data.params == {"SOLVER.BASE_LR": "0.5"}
    history = MlflowClient(uri).get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, 1.0 / 3)]
    assert [m.value for m in MlflowClient(uri).get_metric_history(run.info.run_id, "top_1 ___")] == [50.0, 51.0, 52.0]


def _log_on_every_rank(root, uri):
    os.chdir(root)
    writer = MLflowWriter(root, experiment_name="two_processes", tracking_uri=uri)
    with EventStorage(0) as storage:
        storage.put_scalar("rank", float(comm.get_rank()), smoothing_hint=False)
        writer.write()
        writer.close()
    comm.synchronize()


def test_only_the_main_process_logs_to_mlflow(tmp_path, team_store):
    from mlflow.tracking import MlflowClient

    launch(_log_on_every_rank, num_gpus_per_machine=2, args=(str(tmp_path), team_store),
           timeout=timedelta(seconds=120))
    client = MlflowClient(team_store)
    (run,) = client.search_runs([client.get_experiment_by_name("two_processes").experiment_id])
    assert run.data.metrics == {"rank": 0.0}


def test_a_tracker_whose_package_is_missing_names_the_extra_to_install(tmp_path, monkeypatch):
    for module in ("mlflow", "mlflow.tracking", "wandb"):
        monkeypatch.setitem(sys.modules, module, None)  # what Python does for a package that is not there
    for writer, extra in ((MLflowWriter(str(tmp_path)), "mlflow"), (WandbWriter(str(tmp_path)), "wandb")):
        with EventStorage(0) as storage:
            storage.put_scalar("loss", 1.0)
            with pytest.raises(ImportError, match=rf"pip install 'trainkit\[{extra}\]'.*WRITERS"):
                writer.write()


# ---- Weights & Biases --------------------------------------------------------------------------------------
def wandb_records(path):
    """The records of a W&B run file (``run-<id>.wandb``): W&B's protobuf ``Record`` messages, stored in the
    LevelDB log format (32 KiB blocks of chunks, each with a 7-byte header) after a 7-byte W&B header."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path} is not a W&B run file"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _offline_run(folder):
    (path,) = glob.glob(str(folder / "run-*.wandb"))
    records = wandb_records(path)
    (run,) = [r.run for r in records if r.HasField("run")]
    history = {}
    for r in records:
        if r.HasField("history"):
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            history[r.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    summary = {}
    for r in records:
        if r.HasField("summary"):
            summary.update({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.summary.update})
    return run, history, summary


def test_wandb_offline_run_holds_config_and_every_step_once_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    _needs("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    opts = [*CONSTANT_LR, "SOLVER.LOG_PERIOD", "5", "TEST.EVAL_PERIOD", "10", "WRITERS", '["json", "wandb"]']
    cfg = digits_cfg(tmp_path, *opts, "SOLVER.MAX_ITER", "20")
    train(cfg)
    _, results = train(digits_cfg(tmp_path, *opts, "SOLVER.MAX_ITER", "40"), resume=True)

    first, resumed = sorted(glob.glob(str(tmp_path / "wandb" / "offline-run-*")))
    (run, history, _), (run2, history2, summary) = _offline_run(tmp_path / first), _offline_run(tmp_path / resumed)
    assert run2.run_id == run.run_id  # the resumed run continued the same W&B run
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert {k: v for k, v in config.items() if not k.startswith("_")} == flatten_config(cfg)
    assert sorted(history) == [4, 9, 14, 19] and sorted(history2) == [24, 29, 34, 39]  # each step once
    metrics = read_metrics(tmp_path)
    assert {**history, **history2} == {m["iteration"]: {k: v for k, v in m.items() if k != "iteration"} for m in metrics}
    assert summary["final_evaluation"] == results
    assert (tmp_path / first / "files" / "trainkit_config.yaml").read_text() == cfg.dump()
