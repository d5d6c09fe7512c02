"""parameter_summary, and the summary that DefaultTrainer logs once at the start of a run."""
import logging

import torch
from torch import nn

from trainkit.modeling import parameter_summary


class Frozen(nn.Module):
    """A frozen embedding, a trainable block sharing its weight with the head, a top-level parameter."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4).requires_grad_(False)  # 40, frozen
        self.block = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))  # 20 + 8
        self.head = nn.Linear(4, 4, bias=False)
        self.head.weight = self.block[0].weight  # shared: counted once, in block
        self.scale = nn.Parameter(torch.ones(3))  # 3


def test_the_summary_lists_total_and_trainable_counts_per_top_level_module():
    assert parameter_summary(Frozen()).splitlines() == [
        "| module | parameters | trainable |",
        "|:-------|-----------:|----------:|",
        "| model  |         71 |        31 |",
        "| scale  |          3 |         3 |",  # in named_parameters' order: the module's own first
        "| embed  |         40 |         0 |",
        "| block  |         28 |        28 |",
    ]


def test_the_summary_prints_exact_counts_with_separators():
    lines = parameter_summary(nn.Sequential(nn.Linear(1000, 1000))).splitlines()
    assert lines[2] == "| model  |  1,001,000 | 1,001,000 |"


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_default_trainer_logs_the_summary_once_at_the_start(tmp_path):
    from tests.engine.digits_runs import digits_cfg
    from trainkit.engine import DefaultTrainer
    from trainkit.utils.logger import setup_logger

    setup_logger()  # trainkit's loggers at INFO
    collect = Collect()
    logging.getLogger("trainkit").addHandler(collect)
    try:
        DefaultTrainer(digits_cfg(tmp_path))
    finally:
        logging.getLogger("trainkit").removeHandler(collect)
    summaries = [m for m in collect.messages if m.startswith("Parameters per top-level")]
    assert summaries == [
        "Parameters per top-level module:\n"
        "| module | parameters | trainable |\n"
        "|:-------|-----------:|----------:|\n"
        "| model  |     26,122 |    26,122 |\n"
        "| layers |     26,122 |    26,122 |"
    ]
