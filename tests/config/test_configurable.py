"""@configurable: a class or function takes plain arguments or a config (detectron2's documented behaviour)."""
import pytest
import torch
from torch import nn

from trainkit.config import configurable, get_cfg
from trainkit.modeling import MODEL_REGISTRY, build_model


@MODEL_REGISTRY.register()
class ConfigurableNet(nn.Module):
    @configurable
    def __init__(self, in_features: int, hidden: int, num_classes: int = 10):
        super().__init__()
        self.hidden = hidden
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    @classmethod
    def from_config(cls, cfg):
        return {"in_features": cfg.MODEL.MLP.IN_FEATURES, "hidden": cfg.MODEL.MLP.HIDDEN_DIMS[0],
                "num_classes": cfg.MODEL.NUM_CLASSES}

    def forward(self, batch):
        return {"loss": self.net(batch["image"].flatten(1)).logsumexp(1).mean()}


def _cfg(**overrides):
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "ConfigurableNet"
    cfg.MODEL.MLP.HIDDEN_DIMS = [24]
    cfg.MODEL.NUM_CLASSES = 3
    for k, v in overrides.items():
        setattr(cfg.MODEL, k, v)
    return cfg


def test_a_class_builds_from_a_config_through_the_registry_and_build_model():
    model = build_model(_cfg())
    assert isinstance(model, ConfigurableNet)
    assert model.hidden == 24
    assert [tuple(p.shape) for p in model.parameters()] == [(24, 64), (24,), (3, 24), (3,)]


def test_a_class_builds_from_plain_arguments():
    model = ConfigurableNet(in_features=5, hidden=7)
    assert [tuple(p.shape) for p in model.parameters()] == [(7, 5), (7,), (10, 7), (10,)]
    assert ConfigurableNet(5, 7, 2).net[2].out_features == 2  # positional plain arguments too


def test_keywords_beside_a_config_override_from_config():
    model = ConfigurableNet(_cfg(), hidden=3)
    assert [tuple(p.shape) for p in model.parameters()] == [(3, 64), (3,), (3, 3), (3,)]
    model = ConfigurableNet(cfg=_cfg(), num_classes=5)  # the config by keyword
    assert model.net[2].out_features == 5 and model.hidden == 24


def test_a_subclass_uses_its_own_from_config():
    class Wider(ConfigurableNet):
        @classmethod
        def from_config(cls, cfg):
            return {**super().from_config(cfg), "hidden": 100}

    assert Wider(_cfg()).hidden == 100


@configurable(from_config=lambda cfg, scale=1.0: {"lr": cfg.SOLVER.BASE_LR * scale, "steps": cfg.SOLVER.MAX_ITER})
def make_schedule(lr, steps, warmup=0):
    return (lr, steps, warmup)


def test_a_function_takes_a_config_or_plain_arguments():
    cfg = get_cfg()
    cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER = 0.5, 30
    assert make_schedule(0.1, 10) == (0.1, 10, 0)
    assert make_schedule(lr=0.1, steps=10, warmup=2) == (0.1, 10, 2)
    assert make_schedule(cfg) == (0.5, 30, 0)
    assert make_schedule(cfg, warmup=4, steps=7) == (0.5, 7, 4)
    assert make_schedule(cfg, scale=2.0) == (1.0, 30, 0)  # a keyword that from_config names goes to it
    assert make_schedule(cfg, 4.0) == (2.0, 30, 0)  # so does a positional argument after the config
    assert make_schedule.from_config(cfg) == {"lr": 0.5, "steps": 30}


def test_a_class_without_from_config_called_with_a_config_is_a_clear_error():
    class NoFromConfig(nn.Module):
        @configurable
        def __init__(self, hidden):
            super().__init__()

    assert NoFromConfig(hidden=3) is not None
    with pytest.raises(TypeError, match="NoFromConfig was called with a config, but it has no from_config classmethod"):
        NoFromConfig(get_cfg())


def test_extra_positional_arguments_beside_a_config_are_a_clear_error():
    message = r"ConfigurableNet.from_config cannot take these arguments .*signature is \(cfg\)"
    with pytest.raises(TypeError, match=message):
        ConfigurableNet(_cfg(), 3)
    with pytest.raises(TypeError, match="make_schedule cannot take these arguments"):
        make_schedule(get_cfg(), 1.0, 2.0)


def test_misuse_of_the_decorator_is_a_clear_error():
    with pytest.raises(TypeError, match=r"decorate a function with @configurable\(from_config=...\)"):
        @configurable
        def not_an_init(a):
            return a
    with pytest.raises(TypeError, match="needs from_config"):
        configurable()
    with pytest.raises(TypeError, match="from_config=... is for functions"):
        class A:
            @configurable(from_config=lambda cfg: {})
            def __init__(self):
                pass


def test_from_config_that_is_not_a_classmethod_or_returns_no_dict_is_a_clear_error():
    class Plain:
        @configurable
        def __init__(self, a):
            self.a = a

        def from_config(self, cfg):  # forgot @classmethod
            return {"a": 1}

    with pytest.raises(TypeError, match="Plain.from_config must be a @classmethod"):
        Plain(get_cfg())

    class ReturnsList:
        @configurable
        def __init__(self, a):
            self.a = a

        @classmethod
        def from_config(cls, cfg):
            return [1]

    with pytest.raises(TypeError, match="must return a dict of arguments, got list"):
        ReturnsList(get_cfg())


def test_a_configurable_model_trains_in_the_default_trainer(tmp_path):
    from trainkit.engine import DefaultTrainer

    cfg = _cfg()
    cfg.DATASETS.TRAIN = ("digits_train",)
    cfg.DATASETS.TEST = ()
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_WORKERS = 3, 8, 0
    cfg.OUTPUT_DIR = str(tmp_path)
    trainer = DefaultTrainer(cfg)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert trainer.iter == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
