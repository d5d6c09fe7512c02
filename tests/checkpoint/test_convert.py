import collections
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from trainkit.checkpoint import Checkpointer, UnsafeCheckpointError
from trainkit.checkpoint.convert import convert_trusted_checkpoint


def _old_style_checkpoint():
    return {
        "model": collections.OrderedDict(weight=np.arange(6, dtype=np.float32).reshape(3, 2), bias=np.ones(3)),
        "iteration": np.int64(41),
        "metrics": [np.float64(0.5), "ok"],
    }


def test_converted_numpy_checkpoint_loads_with_weights_only(tmp_path):
    src, dst = tmp_path / "old.pth", tmp_path / "new.pth"
    torch.save(_old_style_checkpoint(), src)
    with pytest.raises(UnsafeCheckpointError):
        Checkpointer(nn.Linear(2, 3)).load(str(src))

    convert_trusted_checkpoint(str(src), str(dst))
    model = nn.Linear(2, 3)
    extra = Checkpointer(model).load(str(dst))
    assert extra == {"iteration": 41, "metrics": [0.5, "ok"]}
    assert type(extra["iteration"]) is int and type(extra["metrics"][0]) is float
    assert torch.equal(model.weight, torch.arange(6, dtype=torch.float32).reshape(3, 2))
    assert torch.equal(model.bias, torch.ones(3))


def test_plain_pickle_with_numpy_arrays_converts(tmp_path):
    src, dst = tmp_path / "old.pkl", tmp_path / "new.pth"
    with open(src, "wb") as f:
        pickle.dump(_old_style_checkpoint(), f)
    convert_trusted_checkpoint(str(src), str(dst))
    data = torch.load(dst, weights_only=True)
    assert list(data["model"]) == ["weight", "bias"]
    assert data["model"]["bias"].dtype == torch.float64


class _Config:  # stands for an arbitrary object pickled into an old checkpoint
    def __init__(self):
        self.lr = 0.1


def test_conversion_reports_objects_it_cannot_convert_and_writes_nothing(tmp_path):
    src, dst = tmp_path / "old.pth", tmp_path / "new.pth"
    torch.save({"model": {"w": torch.ones(1)}, "cfg": _Config()}, src)
    with pytest.raises(TypeError, match=r"\['cfg'\] is a .*_Config"):
        convert_trusted_checkpoint(str(src), str(dst))
    assert not dst.exists()


def test_command_line_converts(tmp_path):
    src, dst = tmp_path / "old.pth", tmp_path / "new.pth"
    torch.save(_old_style_checkpoint(), src)
    result = subprocess.run(
        [sys.executable, "-m", "trainkit.checkpoint.convert", str(src), str(dst)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "RuntimeWarning" not in result.stderr
    assert f"Wrote {dst}" in result.stderr
    assert torch.load(dst, weights_only=True)["iteration"] == 41
