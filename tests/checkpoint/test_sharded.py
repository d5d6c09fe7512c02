"""Sharded (DCP) checkpoints: a SIGKILL inside a 2-process save, and a planted metadata pickle.

The kill test's workers shard a tiny MLP over 2 real gloo processes, save ``first`` completely, take an
optimizer step and start saving ``second``; one rank SIGKILLs itself at a scripted moment of that save (the
moment is reached by wrapping the function that runs there, in the worker only). The test then checks what
the folder holds, as a resumed run would read it.
"""
import os
import pickle
import signal
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from trainkit.checkpoint import CheckpointError, Checkpointer, UnsafeCheckpointError
from trainkit.checkpoint.sharded import ShardedCheckpointer, load_sharded_into_plain, read_metadata
from trainkit.engine import launch
from trainkit.engine.parallel import create_fsdp_model


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _save_then_die_inside_the_next_save(save_dir: str, moment: str) -> None:
    rank = dist.get_rank()
    model = create_fsdp_model(_mlp())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    checkpointer = ShardedCheckpointer(model, save_dir, optimizer=optimizer)

    def step() -> None:
        model(torch.randn(4, 6)).sum().backward()
        optimizer.step()

    step()
    checkpointer.save("first", iteration=0)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(full, os.path.join(save_dir, "..", "first_weights.pth"))
    step()
    if moment == "rank 1 writing its shards" and rank == 1:
        write_data = FileSystemWriter.write_data

        def write_then_die(self, plan, planner):
            write_data(self, plan, planner).wait()  # its shard file is written; DCP never hears back
            _kill_self()

        FileSystemWriter.write_data = write_then_die
    if moment == "rank 0 publishing" and rank == 0:
        # Every rank's shards and the metadata are written; rank 0 dies before the folder is renamed.
        ShardedCheckpointer._publish = lambda *args: _kill_self()
    checkpointer.save("second", iteration=1)


@pytest.mark.parametrize("moment", ["rank 1 writing its shards", "rank 0 publishing"])
def test_sigkill_inside_a_sharded_save_keeps_the_previous_checkpoint_and_tag(tmp_path, moment):
    save_dir = tmp_path / "output"
    with pytest.raises(Exception, match="terminated|signal|exit"):
        launch(_save_then_die_inside_the_next_save, 2, args=(str(save_dir), moment), timeout=timedelta(seconds=60))
    assert (save_dir / "last_checkpoint").read_text() == "first"
    assert (save_dir / ".second.trainkit-tmp").is_dir() and not (save_dir / "second").exists()
    model = _mlp()
    checkpointer = ShardedCheckpointer(model, str(save_dir))
    assert checkpointer.get_all_checkpoint_files() == [str(save_dir / "first")]
    assert checkpointer.resume_or_load("", resume=True) == {"iteration": 0}
    expected = torch.load(tmp_path / "first_weights.pth", weights_only=True)
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, expected[name]), name
    checkpointer.save("third")  # the next save clears what the killed one left
    assert sorted(os.listdir(save_dir)) == ["first", "last_checkpoint", "third"]


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_planted_metadata_pickle_is_refused_and_runs_nothing(tmp_path):
    model = _mlp()
    ShardedCheckpointer(model, str(tmp_path)).save("model_0000000")
    folder = tmp_path / "model_0000000"
    assert read_metadata(str(folder)).state_dict_metadata  # the genuine file reads
    marker = tmp_path / "code_ran"
    (folder / ".metadata").write_bytes(pickle.dumps(_RunsCode(str(marker))))
    for load in (
        lambda: ShardedCheckpointer(_mlp(), str(tmp_path)).resume_or_load("", resume=True),
        lambda: load_sharded_into_plain(_mlp(), str(folder)),
        lambda: Checkpointer(_mlp()).load(str(folder)),
    ):
        with pytest.raises(UnsafeCheckpointError, match=r"names (posix|os)\.system"):
            load()
        assert not marker.exists()
    # What the restriction protects from: DCP's own loader unpickles the same file, and the code runs.
    with pytest.raises(dcp.CheckpointException):  # after os.system ran and returned 0 instead of metadata
        dcp.load({"model": _mlp().state_dict()}, checkpoint_id=str(folder), no_dist=True)
    assert marker.exists()


_RESAVE_AND_DIE = """
import os, signal, sys, torch
from torch import nn
from trainkit.checkpoint import sharded
torch.manual_seed(0)
model = nn.Linear(3, 2)
checkpointer = sharded.ShardedCheckpointer(model, sys.argv[1])
checkpointer.save("model_0000009", iteration=9)
torch.save(model.state_dict(), sys.argv[2])
with torch.no_grad():
    model.weight.add_(1.0)
rmtree = sharded.shutil.rmtree
def die_after_moving_aside(path, *args, **kwargs):
    rmtree(path, *args, **kwargs)
    if os.path.basename(path) == "model_0000009":  # the tagged folder is gone, the new one not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
sharded.shutil.rmtree = die_after_moving_aside
checkpointer.save("model_0000009", iteration=9)  # a preemption at a periodic iteration saves the name again
"""


def test_a_kill_while_a_tagged_checkpoint_is_saved_again_leaves_the_tag_on_a_complete_folder(tmp_path):
    save_dir, expected = tmp_path / "output", tmp_path / "expected.pth"
    proc = subprocess.run([sys.executable, "-c", _RESAVE_AND_DIE, str(save_dir), str(expected)], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not (save_dir / "model_0000009").exists()
    model = nn.Linear(3, 2)
    checkpointer = ShardedCheckpointer(model, str(save_dir))
    assert checkpointer.resume_or_load("", resume=True) == {"iteration": 9}
    for name, weight in torch.load(expected, weights_only=True).items():
        assert torch.equal(model.state_dict()[name], weight), name
    checkpointer.save("model_0000009", iteration=9)  # the next save keeps what the tag names until it is replaced
    assert (save_dir / "last_checkpoint").read_text() == "model_0000009"
    assert sorted(os.listdir(save_dir)) == ["last_checkpoint", "model_0000009"]


def test_resuming_a_sharded_run_from_a_single_file_checkpoint_says_what_to_do(tmp_path):
    Checkpointer(_mlp(), str(tmp_path)).save("model_0000009")
    with pytest.raises(CheckpointError, match="single-file checkpoint of an unsharded run.*MODEL.WEIGHTS"):
        ShardedCheckpointer(_mlp(), str(tmp_path)).resume_or_load("", resume=True)
