"""A small model shared by the accumulation tests of one and of two processes (a module of its own: a test
module imported by another would be imported twice under pytest)."""
import torch
from torch import nn


class TwoMeanLosses(nn.Module):
    """Two losses, each a mean over the batch (so that accumulated micro-batch means equal the batch mean)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, batch):
        x, y = batch
        out = self.net(x)
        return {"loss_mse": ((out - y) ** 2).mean(), "loss_l1": 0.1 * (out - y).abs().mean()}
