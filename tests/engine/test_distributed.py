"""DefaultTrainer under torch.distributed: 2 gloo processes on localhost, started with trainkit's launch().

Spawning costs seconds, so one launch() does the main work and writes what each rank saw into files next to
the run's folder; the tests read them back here:

* run ``uninterrupted``: 20 iterations, checkpoints at 9 and 19, evaluation at 9 and 19; then, on the final
  weights, ``DefaultTrainer.test`` on a plain (unwrapped) model as ``train_net.py --eval-only`` does it;
* run ``resumed``: a fresh folder holding what a run stopped after iteration 9 leaves behind that matters
  (``model_0000009.pth``, its ``last_checkpoint`` tag, the metrics.json lines up to 9), resumed to 20;
* a resume where only rank 0 finds the checkpoint (two machines without a shared ``OUTPUT_DIR``).

The single-process reference runs in this process with the same config (same total batch). Each run's
per-rank records live in ``<OUTPUT_DIR>.records``, so that ``OUTPUT_DIR`` holds exactly what the trainer wrote.
The launched runs use the synthetic data set (no scikit-learn import in the workers); the end-to-end
``train_net.py`` run uses the digits config as it is.
"""
import argparse
import json
import logging
import os
import re
import shutil
import statistics
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import torch.multiprocessing as mp

from tests.engine.digits_runs import MEASUREMENTS
from tests.tools.cli import CONFIG, read_metrics, run_tool
from trainkit.checkpoint import Checkpointer
from trainkit.config import get_cfg
from trainkit.engine import DefaultTrainer, HookBase, default_setup, launch
from trainkit.utils import comm
from trainkit.utils.env import seed_all_rng

MLP_CONFIG = Path(__file__).resolve().parents[2] / CONFIG
MAX_ITER = 20
CHECKPOINT = "model_0000009.pth"  # the checkpoint the resumed run starts from
NUM_TEST_SAMPLES = 1000  # synthetic_test
# Losses are gathered and written every 4 iterations (SOLVER.LOG_PERIOD); the checkpoints and evaluations at 9
# and 19 gather off that period, at the same iteration on every rank. metrics.json has a line for the
# evaluation at 9 (the losses gathered there are written with iteration 11's latest values).
LOSS_ITERS = [3, 7, 11, 15, 19]
METRICS_ITERS = [3, 7, 9, 11, 15, 19]
TIMINGS = MEASUREMENTS  # what a run measures (wall times, memory) differs from run to run
COLLECTIVE_TIMEOUT = timedelta(seconds=120)  # a deadlock fails the test in minutes, not in launch's default 30


def _cfg(output_dir: str, *opts: Any):
    """The digits MLP config (no dropout, SEED 42) on the synthetic data, with a 16-sample total batch and every
    period small."""
    cfg = get_cfg()
    cfg.merge_from_file(str(MLP_CONFIG))
    cfg.merge_from_list([
        "DATASETS.TRAIN", ("synthetic_train",), "DATASETS.TEST", ("synthetic_test",), "OUTPUT_DIR", output_dir,
        "SOLVER.IMS_PER_BATCH", 16, "SOLVER.MAX_ITER", MAX_ITER, "SOLVER.WARMUP_ITERS", 5,
        "SOLVER.CHECKPOINT_PERIOD", 10, "SOLVER.LOG_PERIOD", 4, "TEST.EVAL_PERIOD", 10,
        "DATALOADER.NUM_WORKERS", 0, "MODEL.DEVICE", "cpu", *opts,
    ])
    assert cfg.MODEL.MLP.DROPOUT == 0.0 and cfg.SEED == 42
    cfg.freeze()
    return cfg


def _records_dir(cfg) -> Path:
    return Path(cfg.OUTPUT_DIR + ".records")


class _Recorder(HookBase):
    """Writes this rank's view of the run: its local losses, start iteration, first and last weights."""

    def __init__(self, records: Path, losses: List[float]) -> None:
        self._records, self._losses = records, losses

    def _save_weights(self, name: str) -> None:
        model = getattr(self.trainer.model, "module", self.trainer.model)
        torch.save(model.state_dict(), self._records / f"{name}_rank{comm.get_rank()}.pth")

    def before_train(self) -> None:
        self._save_weights("initial")

    def after_train(self) -> None:
        self._save_weights("final")
        storage = self.trainer.storage  # what this rank put into its storage: the values averaged over ranks
        averaged = {name: storage.history(name).values() for name in ("total_loss", "data_time")}
        evaluation = {k: h.latest() for k, h in storage.histories().items() if k.startswith("classification/")}
        record = {"start_iter": self.trainer.start_iter, "losses": self._losses, "averaged": averaged,
                  "evaluation": evaluation, "pid": os.getpid()}
        (self._records / f"train_rank{comm.get_rank()}.json").write_text(json.dumps(record))


class RecordingTrainer(DefaultTrainer):
    """DefaultTrainer plus a record of each rank's local (not averaged) per-iteration losses."""

    @classmethod
    def build_model(cls, cfg):
        model = super().build_model(cfg)
        model.local_losses = []

        def record_loss(module, inputs, outputs):
            if module.training:
                module.local_losses.append(outputs["loss_cls"].item())

        model.register_forward_hook(record_loss)
        return model

    def build_hooks(self):
        records = _records_dir(self.cfg)
        records.mkdir(exist_ok=True)
        model = getattr(self.model, "module", self.model)
        return super().build_hooks() + [_Recorder(records, model.local_losses)]


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data))


def _close_log_files() -> None:
    # setup_logger() adds a file handler per output folder: drop the last run's before the next one starts.
    trainkit_logger = logging.getLogger("trainkit")
    for handler in list(trainkit_logger.handlers):
        if isinstance(handler, logging.FileHandler):
            trainkit_logger.removeHandler(handler)
            handler.close()


def _train(cfg, resume: bool) -> Dict[str, Any]:
    default_setup(cfg, argparse.Namespace(config_file=str(MLP_CONFIG), eval_only=False))
    trainer = RecordingTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    results = trainer.train()
    _close_log_files()
    return results


def _two_process_worker(root: str) -> None:
    """Worker of the main launch(): the uninterrupted run, evaluation of its weights, the resumed run."""
    torch.set_num_threads(1)
    rank = comm.get_rank()
    cfg = _cfg(os.path.join(root, "uninterrupted"))
    train_results = _train(cfg, resume=False)

    model = DefaultTrainer.build_model(cfg)  # what `train_net.py --eval-only` does
    Checkpointer(model).load(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
    eval_only_results = DefaultTrainer.test(cfg, model)
    _write_json(_records_dir(cfg) / f"results_rank{rank}.json", [train_results, eval_only_results])

    resumed = _cfg(os.path.join(root, "resumed"))
    if comm.is_main_process():  # a run that stopped after iteration 9
        os.makedirs(resumed.OUTPUT_DIR)
        shutil.copy(os.path.join(cfg.OUTPUT_DIR, CHECKPOINT), resumed.OUTPUT_DIR)
        Path(resumed.OUTPUT_DIR, "last_checkpoint").write_text(CHECKPOINT)
        lines = Path(cfg.OUTPUT_DIR, "metrics.json").read_text().splitlines(keepends=True)
        written = [line for line in lines if json.loads(line)["iteration"] <= 9]
        Path(resumed.OUTPUT_DIR, "metrics.json").write_text("".join(written))
    comm.synchronize()
    _train(resumed, resume=True)
    _resume_where_only_rank_0_sees_the_checkpoint(root)


def _resume_where_only_rank_0_sees_the_checkpoint(root: str) -> None:
    # Two machines without a shared OUTPUT_DIR: at the same path, machine 1 has an empty folder.
    output_dir = os.path.join(root, f"machine{comm.get_rank()}")
    os.makedirs(output_dir)
    if comm.is_main_process():
        shutil.copy(os.path.join(root, "uninterrupted", CHECKPOINT), output_dir)
        Path(output_dir, "last_checkpoint").write_text(CHECKPOINT)
    comm.synchronize()
    trainer = DefaultTrainer(_cfg(output_dir))
    try:
        trainer.resume_or_load(resume=True)
        error = None
    except RuntimeError as e:
        error = str(e)
    _write_json(Path(root, f"unshared_resume_rank{comm.get_rank()}.json"), error)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    launch(_two_process_worker, num_gpus_per_machine=2, args=(str(root),), timeout=COLLECTIVE_TIMEOUT)
    cfg = _cfg(str(root / "single"))
    seed_all_rng(cfg.SEED)  # what default_setup does on rank 0
    trainer = RecordingTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return root


def _record(root: Path, run: str, rank: int) -> Dict[str, Any]:
    return json.loads((root / f"{run}.records" / f"train_rank{rank}.json").read_text())


def _weights(root: Path, run: str, name: str) -> Dict[str, torch.Tensor]:
    return torch.load(root / f"{run}.records" / name, weights_only=True)


def _final_model(run_dir: Path) -> Dict[str, torch.Tensor]:
    return torch.load(run_dir / "model_final.pth", weights_only=True)["model"]


def _max_abs_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    assert list(a) == list(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _assert_equal_weights(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a), f"max abs difference {_max_abs_diff(a, b)}"


def _float32_mean(a: float, b: float) -> float:
    # How SimpleTrainer averages across ranks: a float32 mean of the gathered float32 losses.
    return torch.tensor([a, b], dtype=torch.float32).mean().item()


def test_every_rank_starts_from_rank_0_initialisation_as_the_single_process_run(runs):
    single = _weights(runs, "single", "initial_rank0.pth")
    for rank in range(2):
        _assert_equal_weights(_weights(runs, "uninterrupted", f"initial_rank{rank}.pth"), single)


def test_two_process_run_matches_single_process_run_over_the_same_global_batch(runs):
    single_losses = _record(runs, "single", 0)["losses"]
    rank_losses = [_record(runs, "uninterrupted", rank)["losses"] for rank in range(2)]
    assert [len(single_losses)] + [len(losses) for losses in rank_losses] == [MAX_ITER] * 3
    # Each rank saw half of each global batch: the two halves' mean losses average to the global mean loss.
    assert rank_losses[0] != rank_losses[1]
    for it, (single, r0, r1) in enumerate(zip(single_losses, *rank_losses)):
        assert (r0 + r1) / 2 == pytest.approx(single, rel=1e-5, abs=1e-6), f"iteration {it}"
    assert _max_abs_diff(_final_model(runs / "uninterrupted"), _final_model(runs / "single")) < 1e-5


def test_ranks_hold_identical_weights_at_the_end(runs):
    _assert_equal_weights(_weights(runs, "uninterrupted", "final_rank0.pth"),
                          _weights(runs, "uninterrupted", "final_rank1.pth"))
    _assert_equal_weights(_weights(runs, "uninterrupted", "final_rank0.pth"), _final_model(runs / "uninterrupted"))


def test_only_rank_0_writes_files(runs):
    run_dir = runs / "uninterrupted"
    names = sorted(os.listdir(run_dir))
    tfevents = [n for n in names if n.startswith("events.out.tfevents.")]
    assert len(tfevents) == 1
    assert sorted(set(names) - set(tfevents)) == [
        ".trainkit.lock", "config.yaml", "last_checkpoint", "log.txt", "log.txt.rank1", "metrics.json",
        "model_0000009.pth", "model_0000019.pth", "model_final.pth",
    ]
    assert (run_dir / "last_checkpoint").read_text() == "model_final.pth"
    # The event file names its writer's process id: rank 0's.
    assert f".{_record(runs, 'uninterrupted', 0)['pid']}." in tfevents[0]
    rank0_log, rank1_log = (run_dir / "log.txt").read_text(), (run_dir / "log.txt.rank1").read_text()
    assert rank0_log.count("Saving checkpoint to") == 3
    assert "Saving checkpoint to" not in rank1_log and "Wrote the config" not in rank1_log
    assert "Rank of current process: 1. World size: 2" in rank1_log
    # Rank 1 takes part in every collective of the run: it gathered its evaluation counts too.
    assert rank0_log.count(f"over {NUM_TEST_SAMPLES} samples") == 2


def _averaged(root: Path, run: str, rank: int, name: str) -> Dict[int, float]:
    """``{iteration: value}`` of ``name`` in a rank's storage at the end, checked to cover the iterations the
    run trained (a resumed run may also hold the histories restored from its checkpoint)."""
    record = _record(root, run, rank)
    values = {int(it): value for value, it in record["averaged"][name]}
    assert list(values)[-(MAX_ITER - record["start_iter"]):] == list(range(record["start_iter"], MAX_ITER))
    return values


def _smoothed(averaged: Dict[int, float], iteration: int) -> float:
    # JSONWriter writes the median of the last 20 values up to the iteration, as detectron2 does.
    return statistics.median([v for it, v in averaged.items() if it <= iteration][-20:])


def test_every_rank_stores_the_losses_averaged_over_ranks_and_the_slowest_data_time(runs):
    rank_losses = [_record(runs, "uninterrupted", rank)["losses"] for rank in range(2)]
    expected = {it: _float32_mean(r0, r1) for it, (r0, r1) in enumerate(zip(*rank_losses))}
    for rank in range(2):
        assert _averaged(runs, "uninterrupted", rank, "total_loss") == expected
    # data_time is the maximum over ranks, so both ranks hold the same numbers.
    assert _averaged(runs, "uninterrupted", 0, "data_time") == _averaged(runs, "uninterrupted", 1, "data_time")


def test_metrics_json_holds_the_smoothed_averaged_losses_every_log_period(runs):
    averaged = _averaged(runs, "uninterrupted", 0, "total_loss")
    metrics = read_metrics(runs / "uninterrupted")
    assert [m["iteration"] for m in metrics] == METRICS_ITERS  # one writer: each line once
    losses = [m for m in metrics if "total_loss" in m]
    assert [m["iteration"] for m in losses] == LOSS_ITERS
    assert [m["total_loss"] for m in losses] == [_smoothed(averaged, it) for it in LOSS_ITERS]
    assert [m["loss_cls"] for m in losses] == [m["total_loss"] for m in losses]


def test_evaluation_in_two_processes_equals_evaluation_in_one(runs):
    cfg = _cfg(str(runs / "uninterrupted"))
    model = DefaultTrainer.build_model(cfg)
    Checkpointer(model).load(str(runs / "uninterrupted" / "model_final.pth"))
    expected = DefaultTrainer.test(cfg, model)
    assert set(expected) == {"classification"} and 10 < expected["classification"]["top1"] < 100

    rank0, rank1 = (json.loads((runs / "uninterrupted.records" / f"results_rank{r}.json").read_text())
                    for r in range(2))
    # [results of the EvalHook after the last iteration (DDP model), results of a plain model on model_final]
    assert rank0 == [expected, expected]
    assert rank1 == [{}, {}]  # the evaluator gathers to the main process
    last = read_metrics(runs / "uninterrupted")[-1]
    assert [last["classification/top1"], last["classification/top5"]] == [
        expected["classification"]["top1"], expected["classification"]["top5"]]


def test_every_rank_stores_the_main_process_evaluation_results(runs):
    # Hooks that decide from evaluation results (best checkpoint, early stopping) then decide alike everywhere.
    rank0, rank1 = (_record(runs, "uninterrupted", rank)["evaluation"] for rank in (0, 1))
    assert set(rank0) == {"classification/top1", "classification/top5"}
    assert rank1 == rank0


def test_resumed_run_continues_on_every_rank_and_ends_with_the_uninterrupted_weights(runs):
    resumed = runs / "resumed"
    assert [_record(runs, "resumed", rank)["start_iter"] for rank in range(2)] == [10, 10]
    checkpoint = torch.load(runs / "uninterrupted" / CHECKPOINT, weights_only=True)
    assert checkpoint["iteration"] == 9 and len(checkpoint["trainer"]["rng"]) == 2  # every rank's RNG state
    for rank in range(2):  # every rank loaded the weights (DDP alone would have given rank 0's initial ones)
        _assert_equal_weights(_weights(runs, "resumed", f"initial_rank{rank}.pth"), checkpoint["model"])
    rank1_log = (resumed / "log.txt.rank1").read_text()
    assert f"Loading checkpoint from {resumed / CHECKPOINT}" in rank1_log
    assert "Resuming from iteration 10" in rank1_log
    assert "Starting training from iteration 10" in (resumed / "log.txt").read_text()

    # Bit-exact: the same local losses, averaged losses and final weights as the run never interrupted.
    for rank in range(2):
        assert _record(runs, "resumed", rank)["losses"] == _record(runs, "uninterrupted", rank)["losses"][10:]
    averaged, uninterrupted = (_averaged(runs, run, 0, "total_loss") for run in ("resumed", "uninterrupted"))
    assert averaged == {it: uninterrupted[it] for it in averaged}
    _assert_equal_weights(_final_model(resumed), _final_model(runs / "uninterrupted"))

    # metrics.json continues the stopped run's lines, and the metric histories continue from the checkpoint:
    # apart from timings, the file is the uninterrupted run's.
    def without_timings(metrics):
        return [{k: v for k, v in m.items() if k not in TIMINGS} for m in metrics]

    assert without_timings(read_metrics(resumed)) == without_timings(read_metrics(runs / "uninterrupted"))
    names = sorted(n for n in os.listdir(resumed) if not n.startswith("events.out.tfevents."))
    assert names == [".trainkit.lock", "config.yaml", "last_checkpoint", "log.txt", "log.txt.rank1", "metrics.json", CHECKPOINT,
                     "model_0000019.pth", "model_final.pth"]


def test_resuming_when_only_some_processes_see_the_checkpoint_fails_on_every_rank_instead_of_deadlocking(runs):
    # Rank 0 would resume at 10 and rank 1 start at 0: their collectives would never match again.
    message = (f"The processes would start training at different iterations (by rank: [10, 0]): not all of them "
               f"found the checkpoint in OUTPUT_DIR='{runs / 'machine{rank}'}'. Put OUTPUT_DIR on a file system "
               "that every machine shares, or copy the checkpoint and its last_checkpoint tag to that path on "
               "every machine.")
    for rank in range(2):
        error = json.loads((runs / f"unshared_resume_rank{rank}.json").read_text())
        assert error == message.replace("{rank}", str(rank))


def test_train_net_with_two_processes_end_to_end(tmp_path):
    output_dir = tmp_path / "out"
    proc = run_tool("train_net.py", "--num-gpus", "2", "--config-file", CONFIG, "SOLVER.MAX_ITER", "40",
                    "OUTPUT_DIR", str(output_dir))
    assert proc.returncode == 0
    assert "World size: 2" in proc.stdout and "over 359 samples" in proc.stdout  # rank 0 counted both shards

    metrics = read_metrics(output_dir)
    assert [m["iteration"] for m in metrics] == [19, 39]  # LOG_PERIOD 20
    assert "classification/top1" in metrics[-1]
    checkpoint = torch.load(output_dir / "model_final.pth", weights_only=True)
    assert checkpoint["iteration"] == 39 and len(checkpoint["trainer"]["rng"]) == 2
    assert (output_dir / "log.txt.rank1").exists()


def _build_trainer(output_dir: str) -> None:
    torch.set_num_threads(1)
    DefaultTrainer(_cfg(output_dir, "SOLVER.IMS_PER_BATCH", 15))


def test_batch_size_not_divisible_by_the_number_of_processes_fails_through_launch(tmp_path):
    message = ("SOLVER.IMS_PER_BATCH (15) is the total batch size over all processes and must be a positive "
               "multiple of the number of processes (2). Set it to a multiple of 2.")
    with pytest.raises(mp.ProcessRaisedException, match=re.escape(message)):
        launch(_build_trainer, num_gpus_per_machine=2, args=(str(tmp_path),), timeout=COLLECTIVE_TIMEOUT)


class _FailOnRank1(HookBase):
    def after_step(self) -> None:
        if comm.get_rank() == 1 and self.trainer.iter == 5:
            Path(self.trainer.cfg.OUTPUT_DIR, "failed_at").write_text(repr(time.time()))
            raise RuntimeError("rank 1 failed on purpose at iteration 5")


class FailingTrainer(DefaultTrainer):
    def build_hooks(self):
        return super().build_hooks() + [_FailOnRank1()]


def _train_and_fail_on_rank_1(output_dir: str) -> None:
    torch.set_num_threads(1)
    FailingTrainer(_cfg(output_dir)).train()


def test_a_failure_on_one_rank_ends_the_run_with_that_rank_error_instead_of_a_deadlock(tmp_path):
    # Rank 0 goes on into iteration 6, whose gradient all-reduce rank 1 never joins. The failing rank leaves
    # the process group, which makes rank 0's collective fail. (Had rank 0 stayed blocked, torch's launcher
    # would have sent it SIGTERM, which DefaultTrainer's PreemptionHandler catches, and killed it 30 s later.)
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 failed on purpose at iteration 5") as info:
        launch(_train_and_fail_on_rank_1, num_gpus_per_machine=2, args=(str(tmp_path),), timeout=COLLECTIVE_TIMEOUT)
    assert info.value.error_index == 1
    assert time.time() - float((tmp_path / "failed_at").read_text()) < 25
