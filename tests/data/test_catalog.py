import pytest
import torch

from trainkit.data import DatasetCatalog, DatasetFromTensors, MetadataCatalog


@pytest.fixture
def name(request):
    # A fresh name per test, unregistered afterwards so tests do not leak into each other.
    name = f"test_catalog_{request.node.name}"
    yield name
    if name in DatasetCatalog:
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)


def test_get_calls_the_registered_function_each_time(name):
    calls = []

    def make():
        calls.append(1)
        return DatasetFromTensors(x=torch.arange(3))

    DatasetCatalog.register(name, make)
    assert calls == []
    dataset = DatasetCatalog.get(name)
    assert len(dataset) == 3 and dataset[2]["x"].item() == 2
    DatasetCatalog.get(name)
    assert calls == [1, 1]
    assert name in DatasetCatalog.list()


def test_registering_a_name_twice_is_an_error(name):
    DatasetCatalog.register(name, lambda: DatasetFromTensors(x=torch.zeros(1)))
    with pytest.raises(ValueError, match=f"'{name}' is already registered"):
        DatasetCatalog.register(name, lambda: DatasetFromTensors(x=torch.zeros(2)))


def test_unknown_name_raises_key_error_listing_registered_names():
    with pytest.raises(KeyError, match="'no_such_set' is not registered. Registered datasets: .*digits_test, digits_train"):
        DatasetCatalog.get("no_such_set")


def test_register_rejects_non_callable(name):
    with pytest.raises(TypeError, match="func must be callable"):
        DatasetCatalog.register(name, [1, 2])


def test_list_is_sorted_and_holds_the_builtins():
    names = DatasetCatalog.list()
    assert names == sorted(names)
    assert {"digits_train", "digits_test", "synthetic_train", "synthetic_test"} <= set(names)


def test_remove_unregisters(name):
    DatasetCatalog.register(name, lambda: DatasetFromTensors(x=torch.zeros(1)))
    DatasetCatalog.remove(name)
    assert name not in DatasetCatalog
    with pytest.raises(KeyError):
        DatasetCatalog.remove(name)


def test_metadata_set_chains_and_reads_back(name):
    meta = MetadataCatalog.get(name).set(evaluator_type="classification", num_classes=3)
    assert meta is MetadataCatalog.get(name)
    assert meta.name == name
    assert (meta.evaluator_type, meta.num_classes) == ("classification", 3)
    assert meta.get("thing_classes", ["a"]) == ["a"]
    meta.thing_classes = ["x", "y", "z"]
    assert meta.as_dict() == {
        "name": name, "evaluator_type": "classification", "num_classes": 3, "thing_classes": ["x", "y", "z"]
    }


def test_metadata_same_value_again_is_fine_but_a_different_value_is_an_error(name):
    meta = MetadataCatalog.get(name).set(num_classes=3)
    meta.set(num_classes=3)
    with pytest.raises(ValueError, match="'num_classes' of dataset .* is already 3; refusing to change it to 4"):
        meta.set(num_classes=4)
    assert meta.num_classes == 3


def test_metadata_missing_attribute_names_the_available_ones(name):
    meta = MetadataCatalog.get(name).set(num_classes=3)
    with pytest.raises(AttributeError, match=r"no attribute 'evaluator_type'. Available: \['name', 'num_classes'\]"):
        meta.evaluator_type


def test_builtin_metadata():
    for name in ("digits_train", "digits_test", "synthetic_train", "synthetic_test"):
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "classification"
        assert meta.num_classes == 10
        assert meta.thing_classes == [str(i) for i in range(10)]
