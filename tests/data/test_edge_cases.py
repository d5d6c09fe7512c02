"""Edge cases of the data helpers: what ``collate`` makes of Python and numpy numbers."""
import numpy as np
import torch

from trainkit.data.build import collate


def test_collate_turns_python_numbers_into_int64_float32_bool_and_numpy_numbers_keep_their_dtype():
    batch = collate([
        {"i": 1, "f": 0.5, "b": True, "np_f64": np.float64(0.5), "np_i32": np.int32(1), "np_f32": np.float32(0.5)},
        {"i": 2, "f": 1.5, "b": False, "np_f64": np.float64(1.5), "np_i32": np.int32(2), "np_f32": np.float32(1.5)},
    ])
    assert {k: v.dtype for k, v in batch.items()} == {
        "i": torch.int64, "f": torch.float32, "b": torch.bool,
        "np_f64": torch.float64, "np_i32": torch.int32, "np_f32": torch.float32,
    }
    assert batch["np_f64"].tolist() == [0.5, 1.5] and batch["i"].tolist() == [1, 2]
