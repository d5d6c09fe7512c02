"""Async checkpoints: Checkpointer.save(..., blocking=False) and its background writer, with real files."""
import errno
import io
import logging
import os
import shutil
import subprocess
import threading

import pytest
import torch
from torch import nn

from trainkit.checkpoint import BackgroundSaveError, Checkpointer, PeriodicCheckpointer
from trainkit.checkpoint import checkpointer as checkpointer_module
from trainkit.checkpoint import serialization
from trainkit.checkpoint.async_save import snapshot_to_host
from trainkit.checkpoint.serialization import TEMP_SUFFIX, load_checkpoint_file


def _model_and_optimizer(width=16):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, width)).sum().backward()
    optimizer.step()
    return model, optimizer


def _saved_model(path):
    return load_checkpoint_file(str(path))["model"]


@pytest.fixture
def gated_writes(monkeypatch):
    """Background writes that start only when the test sets the returned event (each write waits on it)."""
    gate = threading.Event()
    real = checkpointer_module.atomic_save

    def atomic_save(obj, path):
        if threading.current_thread() is not threading.main_thread():
            assert gate.wait(30), "the test never opened the gate"
        real(obj, path)

    monkeypatch.setattr(checkpointer_module, "atomic_save", atomic_save)
    return gate


def test_snapshot_shares_no_memory_and_no_containers_with_the_live_state():
    model, optimizer = _model_and_optimizer()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": 3, "names": ["a"]}
    snap = snapshot_to_host(state)
    live_ptrs = {t.untyped_storage().data_ptr() for t in state["model"].values()}
    assert not live_ptrs & {t.untyped_storage().data_ptr() for t in snap["model"].values()}
    before = {k: v.clone() for k, v in snap["model"].items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    state["optimizer"]["param_groups"][0]["lr"] = 99.0
    state["names"].append("b")
    assert all(torch.equal(snap["model"][k], before[k]) for k in before)
    assert snap["optimizer"]["param_groups"][0]["lr"] == 0.1 and snap["names"] == ["a"]
    assert type(snap["model"]) is type(state["model"])  # an OrderedDict stays one


def test_async_save_writes_the_state_of_the_moment_of_the_call(tmp_path, gated_writes):
    model, optimizer = _model_and_optimizer()
    checkpointer = Checkpointer(model, str(tmp_path), optimizer=optimizer)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    path = checkpointer.save("model_0000009", blocking=False, iteration=9)
    with torch.no_grad():  # training goes on while the write has not even started
        for p in model.parameters():
            p.mul_(-3.0)
    assert not (tmp_path / "model_0000009.pth").exists() and not (tmp_path / "last_checkpoint").exists()
    gated_writes.set()
    checkpointer.wait()
    assert path == str(tmp_path / "model_0000009.pth")
    saved = load_checkpoint_file(path)
    assert saved["iteration"] == 9 and saved["optimizer"].keys() == optimizer.state_dict().keys()
    assert all(torch.equal(saved["model"][k], expected[k]) for k in expected)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"


def test_the_next_save_waits_for_the_one_in_flight_and_says_so(tmp_path, gated_writes, caplog):
    model, _ = _model_and_optimizer()
    checkpointer = Checkpointer(model, str(tmp_path))
    checkpointer.save("model_a", blocking=False)
    second = threading.Thread(target=checkpointer.save, args=("model_b",), kwargs={"blocking": False})
    with caplog.at_level(logging.INFO, logger="trainkit.checkpoint"):
        second.start()
        second.join(0.5)
        assert second.is_alive(), "the second save did not wait for the first"
        assert list(tmp_path.glob("*.pth")) == []
        gated_writes.set()
        second.join(30)
        checkpointer.wait()
    assert "Waiting for the background save of" in caplog.text and "model_a.pth" in caplog.text
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["model_a.pth", "model_b.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_b.pth"


def test_pruning_runs_only_after_the_new_file_and_tag_are_in_place(tmp_path, gated_writes):
    model, _ = _model_and_optimizer()
    checkpointer = Checkpointer(model, str(tmp_path))
    periodic = PeriodicCheckpointer(checkpointer, period=1, max_to_keep=1, async_save=True)
    gated_writes.set()
    periodic.step(0)
    checkpointer.wait()
    gated_writes.clear()
    periodic.step(1)
    # The write of model_0000001 has not run: model_0000000 is still the last complete checkpoint, untouched.
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["model_0000000.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
    gated_writes.set()
    checkpointer.wait()
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"


def test_a_process_that_does_not_write_never_waits_for_a_disk(tmp_path, gated_writes):
    model, _ = _model_and_optimizer()
    other_rank = Checkpointer(model, str(tmp_path), save_to_disk=False)
    assert other_rank.save("model_a", blocking=False) is None
    assert other_rank.save("model_b", blocking=False) is None  # would block on the gate if it had started a write
    other_rank.wait()
    assert list(tmp_path.iterdir()) == []


class _FullDiskFile(io.FileIO):
    """A real file on which writes fail with ENOSPC once ``room`` bytes are written (the disk fills up)."""

    room = 0

    def write(self, data):
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def _fill_disk_for(monkeypatch, basename, room=1024):
    # Patches the file that serialization._atomic_write opens for ``basename``'s temporary file (fake ENOSPC).
    real_fdopen = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        name = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if mode == "wb" and os.path.basename(name).startswith(f".{basename}."):
            _FullDiskFile.room = room
            return io.BufferedWriter(_FullDiskFile(fd, "wb"))
        return real_fdopen(fd, mode, *args, **kwargs)

    monkeypatch.setattr(serialization.os, "fdopen", fdopen)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="finds the file being written through /proc/self/fd")
def test_a_disk_full_in_the_background_is_raised_at_the_next_save_naming_the_file(tmp_path, monkeypatch):
    model, optimizer = _model_and_optimizer(width=64)
    checkpointer = Checkpointer(model, str(tmp_path), optimizer=optimizer)
    checkpointer.save("model_0000009", blocking=False, iteration=9)
    checkpointer.wait()
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with monkeypatch.context() as patch:
        _fill_disk_for(patch, "model_0000019.pth")
        checkpointer.save("model_0000019", blocking=False, iteration=19)  # returns at once: the error comes later
        with pytest.raises(BackgroundSaveError, match=r"model_0000019\.pth.*No space left") as caught:
            checkpointer.save("model_0000029", blocking=False, iteration=29)
    assert isinstance(caught.value.__cause__, OSError) and caught.value.__cause__.errno == errno.ENOSPC
    assert not (tmp_path / "model_0000029.pth").exists()  # the failed save's successor was not started
    assert not list(tmp_path.glob(f"*{TEMP_SUFFIX}")) and not (tmp_path / "model_0000019.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    # Space is back: a new process resumes from the previous checkpoint and saves again.
    model2, optimizer2 = _model_and_optimizer(width=64)
    with torch.no_grad():
        for p in model2.parameters():
            p.zero_()
    resumed = Checkpointer(model2, str(tmp_path), optimizer=optimizer2)
    assert resumed.resume_or_load("")["iteration"] == 9
    assert all(torch.equal(model2.state_dict()[k], good[k]) for k in good)
    resumed.save("model_0000019", blocking=False, iteration=19)
    resumed.wait()
    assert load_checkpoint_file(str(tmp_path / "model_0000019.pth"))["iteration"] == 19


def _mount_tmpfs(folder, size):
    if shutil.which("mount") is None:
        return "no mount command"
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    return None if proc.returncode == 0 else f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})"


def test_a_real_full_tmpfs_fails_the_background_save_and_space_freed_lets_it_resume(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    why_not = _mount_tmpfs(disk, "4m")
    if why_not:
        pytest.skip(f"{why_not}; the ENOSPC test above covers the same path with a patched file write")
    try:
        model, optimizer = _model_and_optimizer(width=256)  # about 0.5 MB of weights, 1 MB with the momentum
        checkpointer = Checkpointer(model, str(disk / "out"), optimizer=optimizer)
        checkpointer.save("model_0000009", blocking=False, iteration=9)
        checkpointer.wait()
        ballast = disk / "ballast"
        ballast.write_bytes(b"\0" * (4 * 2**20 - 3 * os.path.getsize(disk / "out" / "model_0000009.pth") // 2))
        checkpointer.save("model_0000019", blocking=False, iteration=19)
        with pytest.raises(BackgroundSaveError, match=r"model_0000019\.pth.*No space left"):
            checkpointer.wait()
        assert (disk / "out" / "last_checkpoint").read_text() == "model_0000009.pth"
        assert load_checkpoint_file(str(disk / "out" / "model_0000009.pth"))["iteration"] == 9
        assert sorted(os.listdir(disk / "out")) == ["last_checkpoint", "model_0000009.pth"]
        ballast.unlink()
        resumed = Checkpointer(_model_and_optimizer(width=256)[0], str(disk / "out"))
        assert resumed.resume_or_load("")["iteration"] == 9
        resumed.save("model_0000019", blocking=False, iteration=19)
        resumed.wait()
        assert (disk / "out" / "last_checkpoint").read_text() == "model_0000019.pth"
    finally:
        subprocess.run(["umount", str(disk)], check=True)
