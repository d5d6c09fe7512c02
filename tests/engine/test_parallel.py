"""MODEL.PARALLEL fsdp: DefaultTrainer on torch's fully_shard, in 2 real gloo processes.

One launch() does the work (spawning costs seconds) and writes each run's full weights next to its folder:

* ``sgd`` and ``adamw``: 20 iterations with total-norm gradient clipping that clips every step; compared here
  with the single-process (unsharded) run over the same 16-sample global batch;
* ``adamw`` saves its checkpoints in the background (``SOLVER.CHECKPOINT_ASYNC``, DCP's ``async_save``);
  ``resumed`` starts from its iteration-9 sharded folder in a fresh OUTPUT_DIR and must end bit-exact, and so
  must ``preempted``, stopped by a SIGTERM to rank 1 (PreemptionHandler) and resumed in its own folder.

Then, in this process: the 2-process checkpoint resumes into a 1-process FSDP trainer (a 1-rank gloo group),
and loads into a plain model, through ``load_sharded_into_plain``, ``Checkpointer.load`` of the folder and a
converted single ``.pth`` file.
"""
import os
import shutil
import signal
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from trainkit.checkpoint import Checkpointer
from trainkit.checkpoint.sharded import convert_to_file, load_sharded_into_plain
from trainkit.config import get_cfg
from trainkit.engine import DefaultTrainer, HookBase, launch
from trainkit.engine.parallel import create_fsdp_model, fsdp_blocks, is_fsdp_model
from trainkit.modeling import build_model
from trainkit.utils import comm
from trainkit.utils.env import seed_all_rng

TIMEOUT = timedelta(seconds=120)


def _cfg(output_dir: str, optimizer: str, *opts):
    cfg = get_cfg()
    cfg.merge_from_list([
        "DATASETS.TRAIN", ("synthetic_train",), "OUTPUT_DIR", output_dir, "SEED", 42,
        "MODEL.DEVICE", "cpu", "MODEL.MLP.HIDDEN_DIMS", [32, 32], "MODEL.PARALLEL", "fsdp",
        "SOLVER.OPTIMIZER", optimizer, "SOLVER.BASE_LR", 0.05 if optimizer == "SGD" else 0.01,
        "SOLVER.IMS_PER_BATCH", 16, "SOLVER.MAX_ITER", 20, "SOLVER.WARMUP_ITERS", 0, "SOLVER.STEPS", (),
        "SOLVER.CHECKPOINT_PERIOD", 10, "SOLVER.LOG_PERIOD", 5, "DATALOADER.NUM_WORKERS", 0,
        # The total norm of this MLP's gradients is well above 0.05 at every step: every step clips.
        "SOLVER.CLIP_GRADIENTS.ENABLED", True, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model",
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 0.05, *opts,
    ])
    return cfg


def _full_weights(model):
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class _SigtermOnRank1(HookBase):
    """A preemption notice to one process: rank 1 gets SIGTERM after iteration 5."""

    def after_step(self):
        if self.trainer.iter == 5 and comm.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGTERM)


def _train(cfg, resume=False, hooks=()):
    seed_all_rng(cfg.SEED + comm.get_rank())  # what default_setup does
    trainer = DefaultTrainer(cfg)
    trainer.register_hooks(hooks)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    weights = _full_weights(trainer.model)
    if comm.is_main_process():
        torch.save({"weights": weights, "sharded": is_fsdp_model(trainer.model),
                    "local_numel": sum(getattr(p, "_local_tensor", p).numel() for p in trainer.model.parameters()),
                    "start_iter": trainer.start_iter}, cfg.OUTPUT_DIR + ".result.pth")
    return trainer


def _worker(root: str) -> None:
    torch.set_num_threads(1)
    _train(_cfg(os.path.join(root, "sgd"), "SGD", "SOLVER.CHECKPOINT_MAX_TO_KEEP", 1))
    _train(_cfg(os.path.join(root, "adamw"), "AdamW", "SOLVER.CHECKPOINT_ASYNC", True))
    resumed = os.path.join(root, "resumed")
    if comm.is_main_process():  # a run that stopped after iteration 9
        os.makedirs(resumed)
        shutil.copytree(os.path.join(root, "adamw", "model_0000009"), os.path.join(resumed, "model_0000009"))
        Path(resumed, "last_checkpoint").write_text("model_0000009")
    comm.synchronize()
    _train(_cfg(resumed, "AdamW", "SOLVER.CHECKPOINT_ASYNC", True), resume=True)
    # Preempted: the processes agree at iteration 9 (LOG_PERIOD 5), save model_0000009 again over the periodic
    # one, and stop; the resumed run must end where the uninterrupted one did.
    preempted = _cfg(os.path.join(root, "preempted"), "AdamW", "SOLVER.CHECKPOINT_ASYNC", True)
    stopped = _train(preempted, hooks=[_SigtermOnRank1()])
    assert stopped.iter == 10 and stopped.stop_reason is not None
    _train(preempted, resume=True)


def _result(root: Path, run: str):
    return torch.load(root / f"{run}.result.pth", weights_only=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    launch(_worker, num_gpus_per_machine=2, args=(str(root),), timeout=TIMEOUT)
    for optimizer in ("SGD", "AdamW"):  # the single-process reference: a plain model, the same global batch
        cfg = _cfg(str(root / f"single_{optimizer}"), optimizer, "MODEL.PARALLEL", "ddp")
        _train(cfg)
    return root


@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
def test_fsdp_run_matches_the_single_process_run_with_total_norm_clipping(root, optimizer):
    fsdp, single = _result(root, optimizer.lower()), _result(root, f"single_{optimizer}")
    assert fsdp["sharded"] and not single["sharded"]
    total = sum(w.numel() for w in single["weights"].values())
    assert fsdp["local_numel"] < total  # each process held a shard only
    assert fsdp["weights"].keys() == single["weights"].keys()
    for name, weight in single["weights"].items():
        torch.testing.assert_close(fsdp["weights"][name], weight, rtol=0, atol=1e-6, msg=name)


def test_max_to_keep_deletes_the_old_checkpoint_folders(root):
    assert sorted(p.name for p in (root / "sgd").iterdir() if p.is_dir()) == ["model_0000019", "model_final"]


@pytest.mark.parametrize("run", ["resumed", "preempted"])
def test_sharded_checkpoint_resumes_bit_exact_on_two_processes(root, run):
    resumed, uninterrupted = _result(root, run), _result(root, "adamw")
    assert resumed["start_iter"] == 10 and uninterrupted["start_iter"] == 0
    for name, weight in uninterrupted["weights"].items():
        assert torch.equal(resumed["weights"][name], weight), name


def test_two_process_checkpoint_loads_into_one_fsdp_process_and_into_a_plain_model(root, tmp_path):
    final = _result(root, "adamw")["weights"]
    folder = str(root / "adamw" / "model_final")
    converted = convert_to_file(folder, str(tmp_path / "model_final.pth"))
    # One process with FSDP (a 1-rank group): resharded from 2 shards to 1, with the optimizer and trainer;
    # and the converted file as MODEL.WEIGHTS of a new FSDP run.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        shutil.copytree(folder, tmp_path / "one" / "model_final")
        (tmp_path / "one" / "last_checkpoint").write_text("model_final")
        cfg = _cfg(str(tmp_path / "one"), "AdamW")
        trainer = DefaultTrainer(cfg)
        trainer.resume_or_load(resume=True)
        assert is_fsdp_model(trainer.model) and trainer.start_iter == 20
        assert trainer.optimizer.state_dict()["state"]  # the AdamW moments came back
        loaded = _full_weights(trainer.model)
        from_file = DefaultTrainer(_cfg(str(tmp_path / "two"), "AdamW", "MODEL.WEIGHTS", converted))
        from_file.resume_or_load(resume=False)
        assert from_file.start_iter == 0
        loaded_from_file = _full_weights(from_file.model)
    finally:
        dist.destroy_process_group()
    plain, converted_model, via_checkpointer = (build_model(cfg) for _ in range(3))
    assert load_sharded_into_plain(plain, folder) == {"iteration": 19}
    Checkpointer(converted_model).load(converted)
    Checkpointer(via_checkpointer).load(folder)
    file_weights = torch.load(converted, weights_only=True)["model"]
    for name, weight in final.items():
        for model_weights in (loaded, loaded_from_file, plain.state_dict(), converted_model.state_dict(),
                              via_checkpointer.state_dict(), file_weights):
            assert torch.equal(model_weights[name], weight), name


def test_wrap_policy_default_is_every_child_with_parameters_and_a_typo_is_an_error():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert fsdp_blocks(model) == [model[0], model[2]]
    assert fsdp_blocks(model, ["Sequential"]) == [model[2]]
    stack = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]))
    assert fsdp_blocks(stack) == list(stack[0])  # a ModuleList has no forward: its layers are the blocks
    with pytest.raises(ValueError, match=r"names \['Linaer'\].*Linear"):
        fsdp_blocks(model, ["Linaer"])
    assert create_fsdp_model(model) is model and not is_fsdp_model(model)  # no process group: left as it is


@pytest.mark.parametrize("opts, named", [
    (("SOLVER.AMP.ENABLED", True, "SOLVER.AMP.PRECISION", "float16"), "SOLVER.AMP.PRECISION float16"),
    (("MODEL_EMA.ENABLED", True), "MODEL_EMA.ENABLED"),
    (("MODEL.COMPILE", True), "MODEL.COMPILE"),
])
def test_unsupported_settings_are_refused_before_the_run(tmp_path, opts, named):
    with pytest.raises(NotImplementedError, match=named):
        DefaultTrainer(_cfg(str(tmp_path), "SGD", *opts))
