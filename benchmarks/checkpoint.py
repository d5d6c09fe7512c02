"""How long does a checkpoint stall training, synchronous against async?

One process, one model of about 200 MB (four ``Linear(3584, 3584)``, float32, trained with plain SGD so that
the checkpoint is the model), one folder on a real disk. Each repeat measures, back to back:

* "copy": a bare in-memory copy of the same state (``{k: v.clone() for k, v in state_dict().items()}``): the
  floor of any snapshot on CPU;
* "sync": ``Checkpointer.save(name)``: the stall is the whole write (torch.save, flush, fsync, rename, tag);
* "async": ``Checkpointer.save(name, blocking=False)``: the stall is the snapshot; then training steps run
  while the background writer writes, and their time is compared with steps without a save in flight. The
  first async save allocates the snapshot and is reported apart; later ones overwrite it in place, so the copy
  into kept memory (``copy_`` into the tensors of an earlier copy) is the second floor.

For each, the peak resident memory above the steady state (Linux: ``VmHWM`` after resetting it through
``/proc/self/clear_refs``). Prints medians over the repeats, and the ratios the acceptance asks for: async
stall / sync save time and async stall / bare copy.

Usage: ``python benchmarks/checkpoint.py [--repeats 5] [--threads 1] [--dir FOLDER] [--json FILE] [--width 3584]``
(``--dir`` must be on a real disk, not a tmpfs, so that fsync means something.)
"""
import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from typing import Dict, List

import torch
from torch import nn

from trainkit.checkpoint import Checkpointer

WIDTH, LAYERS, BATCH = 3584, 4, 16


def _rss_peak_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakMemory:
    """Peak RSS above the RSS at entry, in MiB (NaN where /proc/self/clear_refs is not available)."""

    def __enter__(self) -> "PeakMemory":
        self.ok = _rss_peak_reset()
        self.start = _status_kib("VmRSS") if self.ok else 0
        return self

    def __exit__(self, *exc) -> None:
        self.mib = (_status_kib("VmHWM") - self.start) / 1024 if self.ok else float("nan")


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> float:
    start = time.perf_counter()
    loss = model(x).square().mean()
    optimizer.zero_grad(set_to_none=False)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def _fs_type(folder: str) -> str:
    best, kind = "", "?"
    with open("/proc/mounts") as f:
        for line in f:
            _, mount, fs = line.split()[:3]
            if os.path.abspath(folder).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fs
    return kind


def one_repeat(checkpointer, model, optimizer, x, folder: str, index: int) -> Dict[str, float]:
    row: Dict[str, float] = {}
    steady = [_step(model, optimizer, x) for _ in range(5)]
    row["step_s"] = statistics.median(steady)

    with PeakMemory() as mem:
        start = time.perf_counter()
        copy = {k: v.clone() for k, v in model.state_dict().items()}
        row["copy_s"] = time.perf_counter() - start
    row["copy_mem_mib"] = mem.mib
    start = time.perf_counter()
    for kept, live in zip(copy.values(), model.state_dict().values()):
        kept.copy_(live)
    row["copy_into_kept_s"] = time.perf_counter() - start
    del copy

    with PeakMemory() as mem:
        start = time.perf_counter()
        checkpointer.save(f"sync_{index}", iteration=index)
        row["sync_s"] = time.perf_counter() - start
    row["sync_mem_mib"] = mem.mib

    with PeakMemory() as mem:
        start = time.perf_counter()
        checkpointer.save(f"async_{index}", blocking=False, iteration=index)
        row["async_stall_s"] = time.perf_counter() - start
        in_flight: List[float] = []
        while checkpointer.saving:
            in_flight.append(_step(model, optimizer, x))
        checkpointer.wait()
        row["async_write_s"] = time.perf_counter() - start
    row["async_mem_mib"] = mem.mib
    row["steps_in_flight"] = len(in_flight)
    row["step_in_flight_s"] = statistics.median(in_flight) if in_flight else float("nan")
    for name in (f"sync_{index}.pth", f"async_{index}.pth"):
        os.remove(os.path.join(folder, name))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the training step")
    parser.add_argument("--dir", default=None, help="folder on a real disk for the checkpoint files")
    parser.add_argument("--json", default=None, help="also write the rows and medians to this file")
    parser.add_argument("--width", type=int, default=WIDTH, help="layer width (3584: 206 MB of weights)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(LAYERS)])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = torch.randn(BATCH, args.width)
    size_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6
    folder = tempfile.mkdtemp(prefix="trainkit-ckpt-bench-", dir=args.dir)
    print(f"model state {size_mb:.0f} MB; folder {folder} ({_fs_type(folder)}); threads {args.threads}")
    try:
        _step(model, optimizer, x)
        checkpointer = Checkpointer(model, folder, optimizer=optimizer)
        # The first async save allocates its snapshot; later ones overwrite it (reported apart).
        rows = [one_repeat(checkpointer, model, optimizer, x, folder, i) for i in range(args.repeats + 1)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    first, rows = rows[0], rows[1:]
    med = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    print(f"medians over {len(rows)} repeats (after the first save):")
    for key, value in med.items():
        print(f"{key:>18}: {value:.4f}" if key.endswith("_s") else f"{key:>18}: {value:.1f}")
    ratios = {
        "stall_vs_sync": statistics.median(r["async_stall_s"] / r["sync_s"] for r in rows),
        "stall_vs_copy": statistics.median(r["async_stall_s"] / r["copy_s"] for r in rows),
        "stall_vs_copy_into_kept": statistics.median(r["async_stall_s"] / r["copy_into_kept_s"] for r in rows),
        "first_stall_vs_sync": first["async_stall_s"] / first["sync_s"],
        "first_stall_vs_copy": first["async_stall_s"] / first["copy_s"],
        "step_slowdown": statistics.median(r["step_in_flight_s"] / r["step_s"] for r in rows),
    }
    print(f"async stall / sync save: {ratios['stall_vs_sync']:.3f} (acceptance <= 0.15)")
    print(f"async stall / bare copy (fresh memory): {ratios['stall_vs_copy']:.3f} (acceptance <= 1.3)")
    print(f"async stall / bare copy into kept memory: {ratios['stall_vs_copy_into_kept']:.3f}")
    print(f"first async save (allocates the snapshot): stall {first['async_stall_s']:.4f} s = "
          f"{ratios['first_stall_vs_sync']:.3f} of sync, {ratios['first_stall_vs_copy']:.3f} of the bare copy; "
          f"peak extra memory {first['async_mem_mib']:.0f} MiB")
    print(f"step with a save in flight / steady step: {ratios['step_slowdown']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "first": first, "median": med, "size_mb": size_mb, **ratios}, f, indent=1)


if __name__ == "__main__":
    main()
