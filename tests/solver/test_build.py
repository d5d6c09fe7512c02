import pytest
import torch
from torch import nn

from trainkit.config import get_cfg
from trainkit.solver import (
    build_optimizer,
    get_default_optimizer_params,
    maybe_add_gradient_clipping,
    reduce_param_groups,
)


class Net(nn.Module):
    """A small real model with convolution, BatchNorm, LayerNorm, biases, a tied weight and a frozen parameter."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.head = nn.Linear(4, 4, bias=False)
        self.head.weight = self.fc.weight  # shared: must be listed once
        self.scale = nn.Parameter(torch.ones(1), requires_grad=False)  # frozen: not listed

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.head(self.ln(self.fc(x)))


def make_cfg(*opts):
    cfg = get_cfg()
    cfg.merge_from_list(["SOLVER.BASE_LR", 0.1, "SOLVER.MOMENTUM", 0.0, *opts])
    return cfg


def summarize(groups, model):
    """Groups as (hyperparameters, parameter names), for exact comparison."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        ({k: v for k, v in g.items() if k in ("lr", "weight_decay")},
         [names[id(p)] for p in g["params"]])
        for g in groups
    ]


def test_default_groups_give_norm_layers_their_own_weight_decay():
    model = Net()
    groups = get_default_optimizer_params(model, base_lr=0.1, weight_decay=1e-4, weight_decay_norm=0.0)
    assert summarize(groups, model) == [
        ({"lr": 0.1, "weight_decay": 1e-4}, ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]),
        ({"lr": 0.1, "weight_decay": 0.0}, ["bn.weight", "bn.bias", "ln.weight", "ln.bias"]),
    ]


def test_bias_lr_factor_and_weight_decay_bias_apply_to_every_bias_including_norm_biases():
    model = Net()
    cfg = make_cfg("SOLVER.WEIGHT_DECAY", 1e-4, "SOLVER.WEIGHT_DECAY_NORM", 1e-5,
                   "SOLVER.WEIGHT_DECAY_BIAS", 0.0, "SOLVER.BIAS_LR_FACTOR", 2.0)
    optimizer = build_optimizer(cfg, model)
    assert summarize(optimizer.param_groups, model) == [
        ({"lr": 0.1, "weight_decay": 1e-4}, ["conv.weight", "fc.weight"]),
        ({"lr": 0.2, "weight_decay": 0.0}, ["conv.bias", "bn.bias", "fc.bias", "ln.bias"]),
        ({"lr": 0.1, "weight_decay": 1e-5}, ["bn.weight", "ln.weight"]),
    ]


def test_weight_decay_bias_none_means_same_as_weight_decay():
    model = nn.Sequential(nn.Linear(3, 3), nn.GroupNorm(1, 3), nn.InstanceNorm1d(3, affine=True))
    groups = get_default_optimizer_params(model, base_lr=0.1, weight_decay=0.5, weight_decay_norm=0.25)
    assert summarize(groups, model) == [
        ({"lr": 0.1, "weight_decay": 0.5}, ["0.weight", "0.bias"]),
        ({"lr": 0.1, "weight_decay": 0.25}, ["1.weight", "1.bias", "2.weight", "2.bias"]),
    ]


def test_overrides_by_parameter_name():
    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = nn.Parameter(torch.zeros(2))
            self.fc = nn.Linear(2, 2)

    model = WithEmbedding()
    groups = get_default_optimizer_params(
        model, base_lr=1.0, weight_decay=0.1, overrides={"pos_embed": {"weight_decay": 0.0, "lr": 0.5}}
    )
    assert summarize(groups, model) == [
        ({"lr": 0.5, "weight_decay": 0.0}, ["pos_embed"]),
        ({"lr": 1.0, "weight_decay": 0.1}, ["fc.weight", "fc.bias"]),
    ]
    with pytest.raises(ValueError, match=r"overrides\['bias'\] conflicts with bias_lr_factor/weight_decay_bias"):
        get_default_optimizer_params(model, weight_decay_bias=0.0, overrides={"bias": {"lr": 1.0}})
    with pytest.raises(ValueError, match="bias_lr_factor=2.0 needs base_lr; pass base_lr too"):
        get_default_optimizer_params(model, bias_lr_factor=2.0)


def test_reduce_param_groups_merges_identical_hyperparameters_in_first_seen_order():
    a, b, c = (nn.Parameter(torch.zeros(1)) for _ in range(3))
    groups = reduce_param_groups([
        {"params": [a], "lr": 1.0, "weight_decay": 0.0},
        {"params": [b], "weight_decay": 0.1, "lr": 1.0},
        {"params": [c], "weight_decay": 0.0, "lr": 1.0},
    ])
    assert [(g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in groups] == [
        (1.0, 0.0, [id(a), id(c)]),
        (1.0, 0.1, [id(b)]),
    ]


def test_build_optimizer_names_are_case_insensitive():
    model = Net()
    sgd = build_optimizer(make_cfg("SOLVER.OPTIMIZER", "sgd", "SOLVER.MOMENTUM", 0.9, "SOLVER.NESTEROV", True),
                          model)
    assert type(sgd) is torch.optim.SGD
    assert (sgd.defaults["momentum"], sgd.defaults["nesterov"], sgd.defaults["lr"]) == (0.9, True, 0.1)
    adamw = build_optimizer(make_cfg("SOLVER.OPTIMIZER", "ADAMW", "SOLVER.BETAS", "(0.9, 0.95)"), model)
    assert type(adamw) is torch.optim.AdamW
    assert adamw.defaults["betas"] == (0.9, 0.95)


def test_unknown_optimizer_lists_the_valid_ones():
    with pytest.raises(ValueError) as info:
        build_optimizer(make_cfg("SOLVER.OPTIMIZER", "Adam"), Net())
    assert str(info.value) == "Unknown SOLVER.OPTIMIZER 'Adam'; valid ones (any case): SGD, AdamW"


def clipping_cfg(clip_type, clip_value):
    return make_cfg("SOLVER.WEIGHT_DECAY", 0.0, "SOLVER.BASE_LR", 1.0, "SOLVER.CLIP_GRADIENTS.ENABLED", True,
                    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", clip_type, "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", clip_value)


def two_parameter_model_after_backward():
    """A model whose gradients are exactly a = (3, -4, 0.5) and b = (0.3, 0.4) after backward."""
    model = nn.Module()
    model.a = nn.Parameter(torch.zeros(3))
    model.b = nn.Parameter(torch.zeros(2))
    loss = (model.a * torch.tensor([3.0, -4.0, 0.5])).sum() + (model.b * torch.tensor([0.3, 0.4])).sum()
    loss.backward()
    return model


def test_clipping_by_value_clamps_each_gradient_element_before_the_step():
    model = two_parameter_model_after_backward()
    optimizer = build_optimizer(clipping_cfg("value", 1.0), model)
    assert type(optimizer).__name__ == "SGDWithGradientClipping" and isinstance(optimizer, torch.optim.SGD)
    optimizer.step()
    assert model.a.grad.tolist() == [1.0, -1.0, 0.5]
    assert model.b.grad.tolist() == pytest.approx([0.3, 0.4])
    assert model.a.tolist() == [-1.0, 1.0, -0.5]  # the step used the clipped gradient (lr 1, no momentum)


def test_clipping_by_norm_scales_each_parameter_separately():
    model = two_parameter_model_after_backward()
    optimizer = build_optimizer(clipping_cfg("norm", 1.0), model)
    optimizer.step()
    norm_a = (3.0**2 + 4.0**2 + 0.5**2) ** 0.5
    assert model.a.grad.tolist() == pytest.approx([3.0 / norm_a, -4.0 / norm_a, 0.5 / norm_a], rel=1e-5)
    assert model.b.grad.tolist() == pytest.approx([0.3, 0.4])  # norm 0.5 <= 1: unchanged
    assert model.a.tolist() == pytest.approx([-3.0 / norm_a, 4.0 / norm_a, -0.5 / norm_a], rel=1e-5)


def test_clipping_full_model_scales_all_gradients_by_their_total_norm():
    model = two_parameter_model_after_backward()
    optimizer = build_optimizer(clipping_cfg("full_model", 1.0), model)
    optimizer.step()
    total = (3.0**2 + 4.0**2 + 0.5**2 + 0.3**2 + 0.4**2) ** 0.5
    assert model.a.grad.tolist() == pytest.approx([3.0 / total, -4.0 / total, 0.5 / total], rel=1e-5)
    assert model.b.grad.tolist() == pytest.approx([0.3 / total, 0.4 / total], rel=1e-5)


def test_clipping_runs_the_step_hooks_once():
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)  # a plain SGD makes torch wrap SGD.step too
    model = two_parameter_model_after_backward()
    optimizer = build_optimizer(clipping_cfg("value", 1.0), model)
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    optimizer.step()
    assert calls == ["pre", "post"]


def test_clipping_refuses_a_closure():
    model = two_parameter_model_after_backward()
    optimizer = build_optimizer(clipping_cfg("value", 1.0), model)
    with pytest.raises(ValueError, match="cannot step\\(closure\\)"):
        optimizer.step(lambda: torch.tensor(0.0))


def test_clipping_disabled_returns_the_class_itself_and_bad_settings_are_errors():
    assert maybe_add_gradient_clipping(make_cfg(), torch.optim.AdamW) is torch.optim.AdamW
    with pytest.raises(ValueError) as info:
        build_optimizer(clipping_cfg("max", 1.0), Net())
    assert str(info.value) == "Unknown SOLVER.CLIP_GRADIENTS.CLIP_TYPE 'max'; valid ones: value, norm, full_model"
    with pytest.raises(ValueError, match="SOLVER.CLIP_GRADIENTS.CLIP_VALUE must be positive, got -1.0"):
        build_optimizer(clipping_cfg("norm", -1.0), Net())


def test_clipped_optimizer_state_loads_into_a_plain_optimizer(tmp_path):
    model = two_parameter_model_after_backward()
    optimizer = build_optimizer(clipping_cfg("value", 1.0).clone(), model)
    optimizer.step()
    torch.save(optimizer.state_dict(), tmp_path / "opt.pth")
    plain = torch.optim.SGD(model.parameters(), lr=0.5)
    plain.load_state_dict(torch.load(tmp_path / "opt.pth", weights_only=True))
    assert plain.param_groups[0]["lr"] == 1.0
