import collections
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn

from trainkit.checkpoint import Checkpointer, CheckpointError, UnsafeCheckpointError
from trainkit.checkpoint.serialization import (
    TEMP_SUFFIX,
    atomic_save,
    atomic_write_text,
    check_weights_only_loadable,
    load_checkpoint_file,
    remove_stale_temp_files,
)


class _OpensAFile:
    """Pickles as a call to open(marker, "w"): loading it with plain pickle creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ----------------------------------------------------------------------------------- atomic writes


def test_atomic_save_writes_a_loadable_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "a.pth"
    atomic_save({"w": torch.arange(3)}, str(path))
    assert os.listdir(tmp_path) == ["a.pth"]
    assert torch.equal(load_checkpoint_file(str(path))["w"], torch.arange(3))


def test_atomic_save_gives_the_file_the_usual_permissions(tmp_path):
    atomic_save({"w": torch.zeros(1)}, str(tmp_path / "a.pth"))
    with open(tmp_path / "plain", "wb"):
        pass
    assert os.stat(tmp_path / "a.pth").st_mode == os.stat(tmp_path / "plain").st_mode


def test_failed_save_keeps_the_previous_file_and_removes_its_temporary_file(tmp_path):
    path = tmp_path / "a.pth"
    atomic_save({"w": torch.zeros(2)}, str(path))
    with pytest.raises(Exception):
        atomic_save({"w": torch.ones(2), "f": lambda: 0}, str(path))  # a lambda cannot be pickled
    assert os.listdir(tmp_path) == ["a.pth"]
    assert torch.equal(load_checkpoint_file(str(path))["w"], torch.zeros(2))


def test_atomic_write_text_replaces_the_content(tmp_path):
    path = tmp_path / "last_checkpoint"
    atomic_write_text(str(path), "model_0000009.pth")
    atomic_write_text(str(path), "model_0000019.pth")
    assert path.read_text() == "model_0000019.pth"
    assert os.listdir(tmp_path) == ["last_checkpoint"]


def test_remove_stale_temp_files_removes_only_our_temporary_files(tmp_path):
    for name in [f".model_0000009.pth.abc{TEMP_SUFFIX}", f".last_checkpoint.x{TEMP_SUFFIX}", "notes.tmp", "m.pth"]:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temp_files(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == [
        f".last_checkpoint.x{TEMP_SUFFIX}",
        f".model_0000009.pth.abc{TEMP_SUFFIX}",
    ]
    assert sorted(os.listdir(tmp_path)) == ["m.pth", "notes.tmp"]


# ------------------------------------------------------------------------------ weights_only check


def test_weights_only_check_accepts_real_training_state_and_torch_loads_it(tmp_path):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    scaler = torch.amp.GradScaler("cpu")
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": (3, tuple(range(5)), None)},
        "misc": [1.5, "x", b"y", {1, 2}, torch.Size([2]), torch.float16, torch.device("cpu"), None, 1j],
        "counts": collections.OrderedDict(a=1),
        "counter": collections.Counter("aab"),
    }
    check_weights_only_loadable(state)
    # What the check accepts, torch.load(weights_only=True) really loads.
    atomic_save(state, str(tmp_path / "state.pth"))
    loaded = load_checkpoint_file(str(tmp_path / "state.pth"))
    assert loaded["misc"][:5] == state["misc"][:5] and loaded["misc"][5:] == state["misc"][5:]
    assert loaded["counter"] == collections.Counter("aab")
    assert loaded["rng"]["python"] == (3, (0, 1, 2, 3, 4), None)
    momentum = optimizer.state[model.weight]["momentum_buffer"]
    assert torch.equal(loaded["optimizer"]["state"][0]["momentum_buffer"], momentum)


@pytest.mark.parametrize(
    "value, kind",
    [
        (np.zeros(2), "numpy.ndarray"),
        (np.float64(0.5), "numpy.float64"),
        (collections.namedtuple("Pair", "a b")(1, 2), "Pair"),
        (frozenset([1]), "builtins.frozenset"),
    ],
)
def test_weights_only_check_names_the_entry_that_would_not_load(value, kind):
    with pytest.raises(TypeError) as info:
        check_weights_only_loadable({"trainer": {"hooks": [0, value]}}, name="model_0000009.pth")
    message = str(info.value)
    assert message.startswith("model_0000009.pth['trainer']['hooks'][1] is a ")
    assert kind in message and "weights_only=True" in message


def test_weights_only_check_accepts_types_the_user_allowlisted():
    class Allowed:
        pass

    with torch.serialization.safe_globals([Allowed]):
        check_weights_only_loadable({"x": Allowed()})
    with pytest.raises(TypeError):
        check_weights_only_loadable({"x": Allowed()})


# ------------------------------------------------------------------------------------------ loading


def test_missing_file_raises_file_not_found_naming_it(tmp_path):
    path = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint_file(path)


@pytest.mark.parametrize("legacy_format", [False, True])
def test_truncated_file_raises_checkpoint_error_naming_it(tmp_path, legacy_format):
    path = tmp_path / "cut.pth"
    torch.save({"model": {"w": torch.ones(1000)}}, path, _use_new_zipfile_serialization=not legacy_format)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(str(path))
    assert not isinstance(info.value, UnsafeCheckpointError)
    assert f"'{path}' is not a valid checkpoint" in str(info.value)


def test_plain_pickle_is_not_a_checkpoint_and_the_error_points_to_the_converter(tmp_path):
    path = tmp_path / "old.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": 1.0}}))
    with pytest.raises(CheckpointError, match=r"is not a valid checkpoint.*trainkit\.checkpoint\.convert"):
        load_checkpoint_file(str(path))


@pytest.mark.parametrize("content", [b"", b"hello world" * 10])
def test_empty_or_junk_file_raises_checkpoint_error(tmp_path, content):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="is not a valid checkpoint"):
        load_checkpoint_file(str(path))


def test_file_holding_a_tensor_instead_of_a_dict_is_rejected(tmp_path):
    path = tmp_path / "t.pth"
    torch.save(torch.ones(2), path)
    with pytest.raises(CheckpointError, match=r"holds a torch\.Tensor, expected a dict"):
        load_checkpoint_file(str(path))


@pytest.mark.parametrize("legacy_format", [False, True])
def test_pickle_that_carries_code_is_refused_and_never_run(tmp_path, legacy_format):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    payload = {"model": {"w": torch.ones(2)}, "x": _OpensAFile(marker)}
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy_format)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint_file(str(path))
    message = str(info.value)
    assert message.startswith(f"Refusing to load '{path}': its pickle would import and run Python code (io.open)")
    assert f"python -m trainkit.checkpoint.convert {path} NEW.pth" in message
    assert not marker.exists()
    # Through the Checkpointer too, and on the resume path.
    model = nn.Linear(2, 2)
    with pytest.raises(UnsafeCheckpointError):
        Checkpointer(model).load(str(path))
    with pytest.raises(UnsafeCheckpointError):
        Checkpointer(model, str(tmp_path / "empty_run")).resume_or_load(str(path))
    assert not marker.exists()


def test_numpy_arrays_in_an_old_checkpoint_are_refused_as_unsafe(tmp_path):
    path = tmp_path / "old.pth"
    torch.save({"model": {"w": np.ones(3)}}, path)
    with pytest.raises(UnsafeCheckpointError, match="numpy"):
        load_checkpoint_file(str(path))


# -------------------------------------------------------------------------------- SIGKILL mid-save

_KILLED_WRITER = textwrap.dedent(
    """
    import os, sys, time
    import torch
    from trainkit.checkpoint import Checkpointer

    save_dir, stop_at_fsync = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    checkpointer = Checkpointer(model, save_dir)
    checkpointer.save("model_good", iteration=1)

    with torch.no_grad():
        model.weight.fill_(2.0)
    for i in range(64):  # 64 MB in 64 records, so the write takes a while
        model.register_buffer(f"big{i}", torch.full((2**18,), float(i)))

    real_fsync = os.fsync
    fsync_count = 0
    def announcing_fsync(fd):
        global fsync_count
        fsync_count += 1
        print("fsync", flush=True)
        if fsync_count == stop_at_fsync:
            time.sleep(120)  # wait here to be killed
        real_fsync(fd)
    os.fsync = announcing_fsync

    print("saving", flush=True)
    checkpointer.save("model_new", iteration=2)
    print("done", flush=True)
    time.sleep(120)
    """
)

# Where the writer is killed -> the iteration that resuming must restore.
# A save makes 4 fsyncs: the checkpoint's temporary file, the folder after its rename, the tag's temporary
# file, the folder after the tag's rename. "fsync k" kills the writer while it sits in the k-th.
_KILL_POINTS = {"writing": 1, "fsync 1": 1, "fsync 2": 1, "fsync 3": 1, "fsync 4": 2, "done": 2}


def _read_until(proc, line, count=1):
    for _ in range(count):
        while True:
            got = proc.stdout.readline()
            assert got, f"writer exited before printing {line!r}: {proc.stderr.read()}"
            if got.strip() == line:
                break


def _kill_when_temp_file_appears(proc, save_dir):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(n.startswith(".model_new") and n.endswith(TEMP_SUFFIX) for n in os.listdir(save_dir)):
            proc.send_signal(signal.SIGKILL)
            return
    raise AssertionError("the writer never created its temporary file")


def test_sigkill_at_any_moment_of_a_save_leaves_a_valid_checkpoint_to_resume(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(_KILLED_WRITER)
    procs = {}
    try:
        for i, point in enumerate(_KILL_POINTS):
            save_dir = tmp_path / f"run{i}"
            save_dir.mkdir()
            stop_at_fsync = {"writing": "1", "done": "0"}.get(point) or point.split()[1]
            procs[point] = (
                subprocess.Popen(
                    [sys.executable, str(script), str(save_dir), stop_at_fsync],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
                save_dir,
            )
        for point, (proc, save_dir) in procs.items():
            _read_until(proc, "saving")
            if point == "writing":
                _kill_when_temp_file_appears(proc, save_dir)
            else:
                _read_until(proc, *(["done"] if point == "done" else ["fsync", int(point.split()[1])]))
                proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()

    for point, (_, save_dir) in procs.items():
        expected_iteration = _KILL_POINTS[point]
        model = nn.Linear(4, 2)
        checkpointer = Checkpointer(model, str(save_dir))
        extra = checkpointer.resume_or_load("", resume=True)
        assert extra == {"iteration": expected_iteration}, point
        if expected_iteration == 1:
            torch.manual_seed(0)
            assert torch.equal(model.weight, nn.Linear(4, 2).weight), point
        else:
            assert torch.equal(model.weight, torch.full((2, 4), 2.0)), point
        # Leftover temporary files are never taken for checkpoints, and the next save clears them.
        names = ["model_good.pth"] + (["model_new.pth"] if point not in ("writing", "fsync 1") else [])
        assert checkpointer.get_all_checkpoint_files() == [str(save_dir / n) for n in sorted(names)], point
        if point in ("writing", "fsync 1", "fsync 3"):
            assert any(n.endswith(TEMP_SUFFIX) for n in os.listdir(save_dir)), point
        checkpointer.save("model_after", iteration=3)
        assert not any(n.endswith(TEMP_SUFFIX) for n in os.listdir(save_dir)), point


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 64 KiB file system (tmpfs), mounted for the test; skipped where mounting is not allowed."""
    import subprocess

    folder = tmp_path / "tiny_disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_is_named_as_such_with_the_file_and_folder_and_the_last_checkpoint_survives(tiny_disk):
    import errno

    from trainkit.checkpoint import Checkpointer

    small = Checkpointer(torch.nn.Linear(2, 2), str(tiny_disk))
    small.save("model_0000009")
    big = Checkpointer(torch.nn.Linear(256, 256), str(tiny_disk))  # 257 KiB of weights on a 64 KiB disk
    with pytest.raises(OSError) as info:
        big.save("model_0000019")
    assert info.value.errno == errno.ENOSPC
    assert str(info.value).startswith(
        f"[Errno 28] No space left on the disk while writing {tiny_disk / 'model_0000019.pth'} (folder {tiny_disk}, "
    )
    assert "run again with --resume" in str(info.value)
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["last_checkpoint", "model_0000009.pth"]
    assert small.get_checkpoint_file() == str(tiny_disk / "model_0000009.pth")
    small.load(small.get_checkpoint_file())
