import collections
import logging

import torch
from torch import nn

from trainkit.checkpoint.model_loading import (
    format_keys,
    load_model_state_dict,
    strip_compile_prefix,
    strip_module_prefix,
    unwrap_model,
)


def _net(head_out: int = 3, extra: bool = False) -> nn.Module:
    layers = collections.OrderedDict(backbone=nn.Linear(4, 8), head=nn.Linear(8, head_out))
    if extra:
        layers["extra"] = nn.BatchNorm1d(2)
    return nn.Sequential(layers)


def test_shape_mismatch_is_skipped_with_a_warning_naming_key_and_both_shapes(caplog):
    torch.manual_seed(0)
    source = _net(head_out=3)
    target = _net(head_out=5)
    head_before = target.head.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="trainkit.checkpoint"):
        result = load_model_state_dict(target, source.state_dict(), source="ckpt.pth")
    assert "Skip loading 'head.weight' from ckpt.pth: shape (3, 8) in the checkpoint, (5, 8) in the model." in (
        caplog.text
    )
    assert "Skip loading 'head.bias' from ckpt.pth: shape (3,) in the checkpoint, (5,) in the model." in (
        caplog.text
    )
    assert result.shape_mismatches == {"head.weight": ((3, 8), (5, 8)), "head.bias": ((3,), (5,))}
    # Reported once, as mismatches, not again as missing keys.
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert "not in ckpt.pth" not in caplog.text
    assert torch.equal(target.backbone.weight, source.backbone.weight)
    assert torch.equal(target.head.weight, head_before)


def test_missing_and_unexpected_keys_are_listed_grouped_by_module(caplog):
    source = _net()
    source.add_module("old", nn.Linear(2, 2))
    target = _net(extra=True)
    with caplog.at_level(logging.WARNING, logger="trainkit.checkpoint"):
        result = load_model_state_dict(target, source.state_dict(), source="w.pth")
    # BatchNorm itself tolerates a missing num_batches_tracked (old checkpoints), so torch does not report it.
    assert result.missing_keys == ["extra.weight", "extra.bias", "extra.running_mean", "extra.running_var"]
    assert result.unexpected_keys == ["old.weight", "old.bias"]
    assert (
        "Some model parameters or buffers are not in w.pth and keep their current values:\n"
        "  extra.{bias, running_mean, running_var, weight}"
    ) in caplog.text
    assert "Some entries of w.pth are not used by the model and were ignored:\n  old.{bias, weight}" in caplog.text


def test_full_match_logs_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="trainkit.checkpoint"):
        result = load_model_state_dict(_net(), _net().state_dict())
    assert caplog.records == []
    assert result.missing_keys == [] and result.unexpected_keys == [] and result.shape_mismatches == {}


def test_format_keys_groups_leaves_of_one_module_and_keeps_top_level_keys():
    assert format_keys(["a.b.weight", "a.b.bias", "a.c", "top"]) == "  a.b.{bias, weight}\n  a.c\n  top"


def test_module_prefix_is_stripped_only_when_every_key_has_it():
    assert strip_module_prefix({"module.a": 1, "module.b.c": 2}) == {"a": 1, "b.c": 2}
    assert strip_module_prefix({"module.a": 1, "b": 2}) == {"module.a": 1, "b": 2}
    assert strip_module_prefix({}) == {}


def test_data_parallel_state_dict_loads_into_a_plain_model_and_back():
    torch.manual_seed(0)
    wrapped = nn.DataParallel(_net())
    plain = _net()
    load_model_state_dict(plain, wrapped.state_dict())
    assert torch.equal(plain.head.weight, wrapped.module.head.weight)
    other = nn.DataParallel(_net())
    load_model_state_dict(other, plain.state_dict())
    assert torch.equal(other.module.backbone.bias, plain.backbone.bias)
    assert unwrap_model(other) is other.module


def test_a_weight_of_another_dtype_is_cast_with_a_warning_naming_it(caplog):
    source = nn.Linear(2, 2).half()
    target = nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING, logger="trainkit"):
        load_model_state_dict(target, source.state_dict(), source="half.pth")
    assert "Loading 'weight' from half.pth: cast from torch.float16 in the checkpoint to torch.float32 in the model." \
        in caplog.text
    assert target.weight.dtype == torch.float32 and torch.equal(target.weight, source.weight.float())


# torch.compile(model) compiles lazily: building its wrapper and reading its state_dict compile nothing.
def test_a_state_dict_from_torch_compiles_wrapper_loads_into_a_plain_model_with_a_log_line(caplog):
    torch.manual_seed(0)
    compiled = torch.compile(_net())
    saved = compiled.state_dict()
    assert all(key.startswith("_orig_mod.") for key in saved)  # what such a file holds
    plain = _net()
    with caplog.at_level(logging.INFO, logger="trainkit.checkpoint"):
        result = load_model_state_dict(plain, saved, source="compiled.pth")
    assert "Removing the '_orig_mod.' prefix of torch.compile's wrapper from the keys of compiled.pth." in caplog.text
    assert result.missing_keys == [] and result.unexpected_keys == []
    for key, value in plain.state_dict().items():
        assert torch.equal(value, saved["_orig_mod." + key])


def test_unwrap_model_reaches_the_module_inside_torch_compile_and_ddp_wrappers():
    net = _net()
    assert unwrap_model(torch.compile(net)) is net
    assert unwrap_model(torch.compile(nn.DataParallel(net))) is net
    assert unwrap_model(net) is net


def test_compile_prefix_is_stripped_after_a_compiled_submodule_too():
    weight = torch.zeros(2)
    assert strip_compile_prefix({"backbone._orig_mod.fc.weight": weight}) == {"backbone.fc.weight": weight}
    assert strip_compile_prefix({"fc.weight": weight}) == {"fc.weight": weight}
