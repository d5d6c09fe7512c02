import pytest
import torch

from trainkit.data import DatasetFromTensors, RandomShift, shift_image


def test_shift_image_moves_content_and_fills_zeros():
    image = torch.arange(1, 10, dtype=torch.float32).view(1, 3, 3)
    assert shift_image(image, 0, 0).tolist() == image.tolist()
    assert shift_image(image, 1, 0).tolist() == [[[0, 0, 0], [1, 2, 3], [4, 5, 6]]]
    assert shift_image(image, 0, -1).tolist() == [[[2, 3, 0], [5, 6, 0], [8, 9, 0]]]
    assert shift_image(image, -2, 2).tolist() == [[[0, 0, 7], [0, 0, 0], [0, 0, 0]]]
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        shift_image(torch.zeros(3), 1, 1)


def image_dataset():
    images = torch.arange(4 * 25, dtype=torch.float32).view(4, 1, 5, 5) + 1
    return DatasetFromTensors(image=images, label=torch.arange(4))


def test_random_shift_is_a_function_of_the_generator():
    dataset = RandomShift(image_dataset(), max_shift=2)
    a = dataset.get(1, torch.Generator().manual_seed(7))
    b = dataset.get(1, torch.Generator().manual_seed(7))
    assert torch.equal(a["image"], b["image"]) and a["label"].item() == 1
    dy, dx = torch.randint(-2, 3, (2,), generator=torch.Generator().manual_seed(7)).tolist()
    assert torch.equal(a["image"], shift_image(image_dataset()[1]["image"], dy, dx))


def test_random_shift_covers_every_offset_up_to_max_shift():
    dataset = RandomShift(image_dataset(), max_shift=1)
    original = image_dataset()[0]["image"]
    seen = set()
    for seed in range(200):
        shifted = dataset.get(0, torch.Generator().manual_seed(seed))["image"]
        matches = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if torch.equal(shifted, shift_image(original, dy, dx))]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) == 9


def test_zero_max_shift_is_identity_and_negative_is_an_error():
    dataset = RandomShift(image_dataset(), max_shift=0)
    assert torch.equal(dataset.get(2, torch.Generator().manual_seed(0))["image"], image_dataset()[2]["image"])
    assert len(dataset) == 4
    with pytest.raises(ValueError, match="max_shift=-1"):
        RandomShift(image_dataset(), max_shift=-1)


def test_plain_indexing_uses_the_global_rng():
    dataset = RandomShift(image_dataset(), max_shift=2)
    torch.manual_seed(3)
    a = dataset[1]["image"]
    torch.manual_seed(3)
    assert torch.equal(dataset[1]["image"], a)
