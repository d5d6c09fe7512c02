import pytest
import torch
from torch import nn

from trainkit.config import get_cfg
from trainkit.modeling import MODEL_REGISTRY, ConvNetClassifier, MLPClassifier, build_model


def cpu_cfg(arch="MLPClassifier"):
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = arch
    return cfg


def test_builds_the_registered_architecture_on_the_configured_device():
    model = build_model(cpu_cfg())
    assert type(model) is MLPClassifier
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}
    assert type(build_model(cpu_cfg("ConvNetClassifier"))) is ConvNetClassifier


def test_a_user_model_registered_with_the_decorator_is_built_from_the_config():
    @MODEL_REGISTRY.register()
    class TinyUserModel(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.linear = nn.Linear(cfg.MODEL.MLP.IN_FEATURES, cfg.MODEL.NUM_CLASSES)

        def forward(self, batch):
            return {"loss": self.linear(batch["image"].flatten(1)).sum()}

    try:
        cfg = cpu_cfg("TinyUserModel")
        cfg.MODEL.NUM_CLASSES = 3
        model = build_model(cfg)
        assert type(model) is TinyUserModel
        assert model.linear.weight.shape == (3, 64)
    finally:
        MODEL_REGISTRY._obj_map.pop("TinyUserModel")


def test_unknown_architecture_lists_the_registered_ones():
    # Other tests register models too: check the message names the bad name and the built-in ones.
    listed = r"'Resnet' is not registered. Registered models: (.*, )?ConvNetClassifier, (.*, )?MLPClassifier"
    with pytest.raises(KeyError, match=listed):
        build_model(cpu_cfg("Resnet"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_says_to_use_cpu():
    cfg = cpu_cfg()
    cfg.MODEL.DEVICE = "cuda"
    with pytest.raises(RuntimeError, match="MODEL.DEVICE is 'cuda' but CUDA is not available.*Set MODEL.DEVICE cpu"):
        build_model(cfg)


def test_invalid_device_name_is_a_value_error():
    cfg = cpu_cfg()
    cfg.MODEL.DEVICE = "gpu0"
    with pytest.raises(ValueError, match="MODEL.DEVICE 'gpu0' is not a valid torch device"):
        build_model(cfg)
