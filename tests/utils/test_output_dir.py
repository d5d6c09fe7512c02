"""The OUTPUT_DIR lock: one run at a time per folder, released by the kernel when its process dies."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from trainkit.utils.output_dir import LOCK_FILE, OutputDirInUseError, lock_output_dir, unlock_output_dir

_HOLD = textwrap.dedent("""
    import sys, time
    from trainkit.utils.output_dir import lock_output_dir
    lock_output_dir(sys.argv[1])
    print("locked", flush=True)
    time.sleep(120)
""")


def _holder(folder):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_gets_an_error_naming_the_folder_and_the_pid_and_a_sigkill_frees_the_lock(tmp_path):
    folder = tmp_path / "out"
    holder = _holder(folder)
    try:
        with pytest.raises(OutputDirInUseError) as info:
            lock_output_dir(str(folder))
        assert f"OUTPUT_DIR {str(folder)!r} is in use by another run (PID {holder.pid}" in str(info.value)
        assert "give this run another OUTPUT_DIR" in str(info.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # No stale lock after a SIGKILL: the kernel released it with the process.
    assert lock_output_dir(str(folder)) is True
    assert (folder / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    unlock_output_dir(str(folder))


def test_the_same_process_may_take_its_own_lock_again(tmp_path):
    assert lock_output_dir(str(tmp_path)) is True
    assert lock_output_dir(str(tmp_path)) is False
    unlock_output_dir(str(tmp_path))
    assert lock_output_dir(str(tmp_path)) is True  # released: taken afresh
    unlock_output_dir(str(tmp_path))
