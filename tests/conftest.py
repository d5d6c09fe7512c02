"""Test-wide settings.

One intra-op thread: the tests' models are tiny, and with two threads on a two-core machine that also runs
other test processes (gloo workers, subprocess runs) a step can become many times slower.
"""
import torch

torch.set_num_threads(1)
