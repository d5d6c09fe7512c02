"""Peak memory per process: DDP against FSDP (MODEL.PARALLEL ddp / fsdp), 2 gloo processes on the CPU.

The model is a stack of ``--blocks`` ``Linear(--width, --width)`` layers (8 x 2048 x 2048: 33.6M parameters,
134 MB in float32; with their gradients and AdamW's two moments, 537 MB under DDP). Each variant trains
``--iters`` steps of AdamW in a ``SimpleTrainer``, its model wrapped by trainkit's ``create_ddp_model`` or
sharded by ``create_fsdp_model``, in 2 fresh processes.

Measured per process: the peak resident memory (``ru_maxrss``) minus the resident memory just before the
model was built, so that the interpreter, torch and the process group are left out. The table gives both
variants, the ratio FSDP / DDP, and the float32 bytes of parameters + gradients + AdamW state that the
process holds by design (all of them under DDP, its shard under FSDP).

Usage: ``python benchmarks/fsdp_memory.py [--blocks 8] [--width 2048] [--iters 3]``
"""
import argparse
import itertools
import json
import os
import resource
import tempfile
from datetime import timedelta

import torch
from torch import nn

from trainkit.engine import SimpleTrainer, create_ddp_model, launch
from trainkit.engine.parallel import create_fsdp_model
from trainkit.utils import comm

MB = 2**20


class Stack(nn.Module):
    def __init__(self, blocks: int, width: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))

    def forward(self, x):
        for block in self.blocks:
            x = torch.relu(block(x))
        return {"loss": x.square().mean()}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _worker(variant: str, blocks: int, width: int, iters: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    before = _rss_mb()
    model = Stack(blocks, width)
    model = create_fsdp_model(model) if variant == "fsdp" else create_ddp_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randn(8, width)
    SimpleTrainer(model, itertools.repeat(batch), optimizer, gather_metric_period=iters).train(0, iters)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    held = sum(getattr(p, "_local_tensor", p).numel() for p in model.parameters()) * 4 * 4 / MB  # p, grad, 2 moments
    with open(os.path.join(out, f"{variant}_rank{comm.get_rank()}.json"), "w") as f:
        json.dump({"peak_mb": peak - before, "held_mb": held}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    # glibc keeps freed large blocks in its heap once its mmap threshold has grown, so resident memory would
    # count memory that torch freed long ago; a fixed threshold hands every large tensor back when freed. Set
    # here, it reaches the processes that launch() spawns.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 16))
    with tempfile.TemporaryDirectory() as out:
        for variant in ("ddp", "fsdp"):
            launch(_worker, 2, args=(variant, args.blocks, args.width, args.iters, out), timeout=timedelta(minutes=10))
        rows = {v: [json.load(open(os.path.join(out, f"{v}_rank{r}.json"))) for r in range(2)] for v in ("ddp", "fsdp")}
    params = args.blocks * (args.width**2 + args.width)
    print(f"model: {args.blocks} x Linear({args.width}, {args.width}), {params / 1e6:.1f}M parameters, AdamW, "
          f"{args.iters} steps, 2 gloo processes")
    print("variant  rank  peak over baseline (MB)  params+grads+AdamW held (MB)")
    for variant, ranks in rows.items():
        for rank, row in enumerate(ranks):
            print(f"{variant:<8} {rank:<5} {row['peak_mb']:>23.0f}  {row['held_mb']:>28.1f}")
    ratio = max(r["peak_mb"] for r in rows["fsdp"]) / max(r["peak_mb"] for r in rows["ddp"])
    print(f"ratio fsdp/ddp (largest rank): {ratio:.2f}")


if __name__ == "__main__":
    main()
