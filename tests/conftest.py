"""Test-wide settings.

One intra-op thread: the tests' models are tiny, and with two threads on a two-core machine that also runs
other test processes (gloo workers, subprocess runs) a step can become many times slower.
"""
import socket

import pytest
import torch
import torch.distributed as dist

torch.set_num_threads(1)


@pytest.fixture
def gloo_group():
    """A one-process gloo group on a free localhost port, destroyed afterwards (e.g. to wrap a model in DDP)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
