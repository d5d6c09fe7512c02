import pytest
import torch

from trainkit.data import ConcatDataset, DatasetFromTensors, PositionSeededDataset, RandomShift, derive_seed, get_item
from trainkit.data.samplers import AUGMENT_TAG


class DrawingDataset(torch.utils.data.Dataset):
    """Item i is (i, one draw from the generator): shows which generator a wrapper passed."""

    def __len__(self):
        return 3

    def __getitem__(self, index):
        return {"index": index, "draw": -1}

    def get(self, index, generator):
        return {"index": index, "draw": torch.randint(1000, (1,), generator=generator).item()}


def draw(seed):
    return torch.randint(1000, (1,), generator=torch.Generator().manual_seed(seed)).item()


def test_dataset_from_tensors_indexes_every_tensor():
    dataset = DatasetFromTensors(a=torch.arange(3), b=torch.arange(3) * 10)
    assert len(dataset) == 3
    assert {k: v.item() for k, v in dataset[2].items()} == {"a": 2, "b": 20}
    with pytest.raises(ValueError, match=r"same length, got \{'a': 3, 'b': 2\}"):
        DatasetFromTensors(a=torch.arange(3), b=torch.arange(2))


def test_get_item_uses_get_only_with_a_generator():
    dataset = DrawingDataset()
    assert get_item(dataset, 1, None) == {"index": 1, "draw": -1}
    assert get_item(dataset, 1, torch.Generator().manual_seed(5)) == {"index": 1, "draw": draw(5)}
    assert get_item(DatasetFromTensors(a=torch.arange(2)), 1, torch.Generator())["a"].item() == 1


def test_concat_dataset_forwards_get_to_the_right_part():
    dataset = ConcatDataset([DrawingDataset(), DatasetFromTensors(index=torch.arange(10, 12))])
    assert len(dataset) == 5
    assert dataset.get(2, torch.Generator().manual_seed(1)) == {"index": 2, "draw": draw(1)}
    assert dataset.get(3, torch.Generator().manual_seed(1))["index"].item() == 10
    assert dataset.get(-1, torch.Generator())["index"].item() == 11
    with pytest.raises(IndexError, match="index 5 out of range"):
        dataset.get(5, torch.Generator())


def test_position_seeded_dataset_seeds_from_seed_and_position_only():
    dataset = PositionSeededDataset(DrawingDataset(), seed=9)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert dataset[(17, 2)] == {"index": 2, "draw": draw(derive_seed(9, AUGMENT_TAG, 17))}
    assert dataset[(17, 0)]["draw"] == dataset[(17, 2)]["draw"]
    assert [dataset[(p, 0)]["draw"] for p in range(5)] == [draw(derive_seed(9, AUGMENT_TAG, p)) for p in range(5)]
    assert torch.equal(torch.get_rng_state(), state)
    plain = PositionSeededDataset(DatasetFromTensors(a=torch.arange(3)), seed=9)
    assert plain[(100, 1)]["a"].item() == 1 and len(plain) == 3


def test_augmentation_through_a_concatenation():
    images = torch.ones(2, 1, 4, 4)
    parts = [DatasetFromTensors(image=images), DatasetFromTensors(image=images * 2)]
    dataset = PositionSeededDataset(RandomShift(ConcatDataset(parts), max_shift=1), seed=0)
    assert dataset[(0, 3)]["image"].max().item() == 2.0
    assert torch.equal(dataset[(4, 3)]["image"], dataset[(4, 3)]["image"])
