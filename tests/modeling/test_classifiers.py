import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainkit.config import get_cfg
from trainkit.modeling import ConvNetClassifier, MLPClassifier


def make_cfg(**mlp):
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    for key, value in mlp.items():
        setattr(cfg.MODEL.MLP, key, value)
    return cfg


def batch(n=6, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 1, size, size, generator=g), "label": torch.arange(n) % 10}


def test_mlp_layers_follow_hidden_dims_and_dropout():
    model = MLPClassifier(make_cfg(HIDDEN_DIMS=[32, 16], DROPOUT=0.5))
    kinds = [type(m) for m in model.layers]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert [(m.in_features, m.out_features) for m in model.layers if isinstance(m, nn.Linear)] == [(64, 32), (32, 16), (16, 10)]
    assert [type(m) for m in MLPClassifier(make_cfg(HIDDEN_DIMS=[])).layers] == [nn.Linear]


@pytest.mark.parametrize("model_cls", [MLPClassifier, ConvNetClassifier])
def test_training_returns_cross_entropy_and_eval_returns_logits(model_cls):
    torch.manual_seed(0)
    cfg = make_cfg()
    cfg.MODEL.CONVNET.DROPOUT = 0.0
    model = model_cls(cfg)
    data = batch()
    model.eval()
    with torch.no_grad():
        out = model(data)
    assert list(out) == ["logits"] and out["logits"].shape == (6, 10)
    model.train()
    losses = model(data)
    assert list(losses) == ["loss_cls"] and losses["loss_cls"].dim() == 0
    assert torch.allclose(losses["loss_cls"], F.cross_entropy(out["logits"], data["label"]), rtol=0, atol=1e-6)
    losses["loss_cls"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_eval_does_not_need_labels():
    model = MLPClassifier(make_cfg()).eval()
    assert model({"image": torch.zeros(2, 1, 8, 8)})["logits"].shape == (2, 10)


def test_convnet_pools_8x8_features_with_a_2x2_max_pool():
    cfg = make_cfg()
    cfg.MODEL.CONVNET.CHANNELS = [4]
    model = ConvNetClassifier(cfg).eval()
    images = batch()["image"]
    conv = F.relu(model.features[0](images))
    expected = model.head(F.max_pool2d(conv, 2).flatten(1))
    assert torch.allclose(model({"image": images})["logits"], expected, rtol=0, atol=1e-6)
    assert model({"image": batch(size=12)["image"]})["logits"].shape == (6, 10)


def test_dropout_is_active_only_in_training():
    cfg = make_cfg(DROPOUT=0.5)
    model = MLPClassifier(cfg)
    data = batch()
    model.train()
    torch.manual_seed(1)
    a = model(data)["loss_cls"]
    torch.manual_seed(2)
    assert a.item() != model(data)["loss_cls"].item()
    model.eval()
    assert torch.equal(model(data)["logits"], model(data)["logits"])


def test_wrong_input_size_names_the_config_key():
    model = MLPClassifier(make_cfg())
    with pytest.raises(ValueError, match=r"expects 64 input values.*shape \(6, 1, 4, 4\). Set MODEL.MLP.IN_FEATURES to 16"):
        model(batch(size=4))
    with pytest.raises(ValueError, match=r"MODEL.MLP.HIDDEN_DIMS must hold positive sizes, got \[8, 0\]"):
        MLPClassifier(make_cfg(HIDDEN_DIMS=[8, 0]))
