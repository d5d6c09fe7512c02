import collections
import logging
import os

import numpy as np
import pytest
import torch
from torch import nn

from trainkit.checkpoint import Checkpointer, CheckpointError, PeriodicCheckpointer


def _mlp() -> nn.Module:
    return nn.Sequential(collections.OrderedDict(fc1=nn.Linear(4, 8), act=nn.ReLU(), fc2=nn.Linear(8, 3)))


def _training_state(seed: int):
    torch.manual_seed(seed)
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[2, 4], gamma=0.5)
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = model(torch.randn(5, 4, generator=generator)).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def _assert_same_parameters(a: nn.Module, b: nn.Module):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert list(state_a) == list(state_b)
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


# ------------------------------------------------------------------------------------- round trips


def test_round_trip_restores_model_optimizer_and_scheduler_exactly(tmp_path):
    model, optimizer, scheduler = _training_state(seed=0)
    _train(model, optimizer, scheduler, steps=3)
    Checkpointer(model, str(tmp_path), optimizer=optimizer, scheduler=scheduler).save("model_0000002", iteration=2)

    model2, optimizer2, scheduler2 = _training_state(seed=1)
    extra = Checkpointer(model2, str(tmp_path), optimizer=optimizer2, scheduler=scheduler2).resume_or_load("")
    assert extra == {"iteration": 2}
    _assert_same_parameters(model, model2)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(optimizer.state[p]["momentum_buffer"], optimizer2.state[p2]["momentum_buffer"])
    assert scheduler2.get_last_lr() == scheduler.get_last_lr() == [0.05]
    assert scheduler2.last_epoch == 3

    # Both continue identically: same next LR (milestone 4 halves it again), same parameters.
    _train(model, optimizer, scheduler, steps=1, seed=7)
    _train(model2, optimizer2, scheduler2, steps=1, seed=7)
    assert scheduler2.get_last_lr() == scheduler.get_last_lr() == [0.025]
    _assert_same_parameters(model, model2)


def test_checkpoint_file_holds_model_checkpointables_and_extra_data(tmp_path):
    model, optimizer, _ = _training_state(seed=0)
    path = Checkpointer(model, str(tmp_path), optimizer=optimizer).save("m", iteration=5, best=0.25)
    assert path == str(tmp_path / "m.pth")
    data = torch.load(path, weights_only=True)
    assert sorted(data) == ["best", "iteration", "model", "optimizer"]
    assert list(data["model"]) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert (tmp_path / "last_checkpoint").read_text() == "m.pth"


def test_ddp_model_saves_without_module_prefix_and_loads_into_either_form(tmp_path, gloo_group):
    torch.manual_seed(0)
    ddp = nn.parallel.DistributedDataParallel(_mlp())
    Checkpointer(ddp, str(tmp_path / "from_ddp")).save("m")
    saved = torch.load(tmp_path / "from_ddp" / "m.pth", weights_only=True)["model"]
    assert list(saved) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]

    plain = _mlp()
    Checkpointer(plain).load(str(tmp_path / "from_ddp" / "m.pth"))
    _assert_same_parameters(plain, ddp.module)

    torch.manual_seed(1)
    source = _mlp()
    Checkpointer(source, str(tmp_path / "from_plain")).save("m")
    ddp2 = nn.parallel.DistributedDataParallel(_mlp())
    Checkpointer(ddp2).load(str(tmp_path / "from_plain" / "m.pth"))
    _assert_same_parameters(ddp2.module, source)


def test_state_dict_of_a_raw_ddp_model_loads_into_a_plain_model(tmp_path, gloo_group):
    ddp = nn.parallel.DistributedDataParallel(_mlp())
    torch.save(ddp.state_dict(), tmp_path / "raw.pth")  # keys carry "module."
    plain = _mlp()
    assert Checkpointer(plain).load(str(tmp_path / "raw.pth")) == {}
    _assert_same_parameters(plain, ddp.module)


def test_plain_state_dict_file_loads_as_model_weights(tmp_path):
    torch.manual_seed(0)
    source = _mlp()
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    target = _mlp()
    assert Checkpointer(target).load(str(tmp_path / "weights.pth")) == {}
    _assert_same_parameters(target, source)


def test_dict_without_model_entry_that_is_not_a_state_dict_is_rejected(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(1)}, "epoch": 3}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"has no 'model' entry .* keys: \['epoch', 'state_dict'\]"):
        Checkpointer(_mlp()).load(str(tmp_path / "other.pth"))


# -------------------------------------------------------------------------------------- load options


def test_load_restores_only_the_named_checkpointables_and_returns_only_extra_data(tmp_path):
    model, optimizer, scheduler = _training_state(seed=0)
    _train(model, optimizer, scheduler, steps=3)
    Checkpointer(model, str(tmp_path), optimizer=optimizer, scheduler=scheduler).save("m", iteration=2)

    model2, optimizer2, scheduler2 = _training_state(seed=1)
    checkpointer = Checkpointer(model2, optimizer=optimizer2, scheduler=scheduler2)
    extra = checkpointer.load(str(tmp_path / "m.pth"), checkpointables=["scheduler"])
    assert extra == {"iteration": 2}
    assert scheduler2.last_epoch == 3
    assert optimizer2.state_dict()["state"] == {}  # not restored
    with pytest.raises(KeyError, match=r"Unknown checkpointable name\(s\) \['optimzer'\]"):
        checkpointer.load(str(tmp_path / "m.pth"), checkpointables=["optimzer"])


def test_checkpointable_missing_from_the_file_is_skipped_with_a_warning(tmp_path, caplog):
    model, optimizer, scheduler = _training_state(seed=0)
    Checkpointer(model, str(tmp_path), optimizer=optimizer).save("m")
    checkpointer = Checkpointer(_mlp(), scheduler=scheduler)
    with caplog.at_level(logging.WARNING, logger="trainkit.checkpoint"):
        extra = checkpointer.load(str(tmp_path / "m.pth"))
    assert list(extra) == ["optimizer"]  # an entry of no registered checkpointable is extra data
    assert f"{tmp_path / 'm.pth'} has no 'scheduler' entry: scheduler keeps its current state." in caplog.text


def test_checkpointable_that_rejects_its_state_raises_naming_it_and_the_file(tmp_path):
    model, optimizer, _ = _training_state(seed=0)
    Checkpointer(model, str(tmp_path), optimizer=optimizer).save("m")
    other_model = _mlp()
    fewer_params = torch.optim.SGD(list(other_model.parameters())[:2], lr=0.1)
    with pytest.raises(CheckpointError, match=r"Could not restore 'optimizer' from '.*m\.pth'"):
        Checkpointer(other_model, optimizer=fewer_params).load(str(tmp_path / "m.pth"))


def test_empty_path_says_so_and_loads_nothing(caplog):
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="trainkit.checkpoint"):
        assert Checkpointer(model).load("") == {}
    assert "No checkpoint file given" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_file_raises_file_not_found_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        Checkpointer(_mlp()).load(str(tmp_path / "nothere.pth"))


def test_load_logs_what_was_restored_and_from_where(tmp_path, caplog):
    model, optimizer, _ = _training_state(seed=0)
    Checkpointer(model, str(tmp_path), optimizer=optimizer).save("m", iteration=4)
    with caplog.at_level(logging.INFO, logger="trainkit.checkpoint"):
        Checkpointer(_mlp(), optimizer=torch.optim.SGD(_mlp().parameters(), lr=1)).load(str(tmp_path / "m.pth"))
    assert f"Restored model, optimizer from {tmp_path / 'm.pth'} (extra data: ['iteration'])" in caplog.text


# -------------------------------------------------------------------------------- resume_or_load


def test_resume_or_load_prefers_the_last_checkpoint_and_restores_everything(tmp_path):
    model, optimizer, scheduler = _training_state(seed=0)
    _train(model, optimizer, scheduler, steps=3)
    Checkpointer(model, str(tmp_path / "run"), optimizer=optimizer, scheduler=scheduler).save("m", iteration=2)
    torch.manual_seed(5)
    weights = _mlp()
    torch.save(weights.state_dict(), tmp_path / "init.pth")

    model2, optimizer2, scheduler2 = _training_state(seed=1)
    checkpointer = Checkpointer(model2, str(tmp_path / "run"), optimizer=optimizer2, scheduler=scheduler2)
    assert checkpointer.resume_or_load(str(tmp_path / "init.pth"), resume=True) == {"iteration": 2}
    _assert_same_parameters(model2, model)
    assert scheduler2.last_epoch == 3


def test_resume_or_load_without_resume_loads_only_model_weights_from_path(tmp_path):
    model, optimizer, scheduler = _training_state(seed=0)
    _train(model, optimizer, scheduler, steps=3)
    Checkpointer(model, str(tmp_path), optimizer=optimizer, scheduler=scheduler).save("m", iteration=2)

    model2, optimizer2, scheduler2 = _training_state(seed=1)
    checkpointer = Checkpointer(model2, str(tmp_path), optimizer=optimizer2, scheduler=scheduler2)
    extra = checkpointer.resume_or_load(str(tmp_path / "m.pth"), resume=False)
    assert extra == {"iteration": 2}
    _assert_same_parameters(model2, model)
    assert scheduler2.last_epoch == 0 and optimizer2.state_dict()["state"] == {}


def test_resume_or_load_falls_back_to_path_when_there_is_no_checkpoint(tmp_path):
    torch.manual_seed(3)
    weights = _mlp()
    torch.save(weights.state_dict(), tmp_path / "init.pth")
    model = _mlp()
    checkpointer = Checkpointer(model, str(tmp_path / "empty_run"))
    assert not checkpointer.has_checkpoint() and checkpointer.get_checkpoint_file() == ""
    assert checkpointer.resume_or_load(str(tmp_path / "init.pth"), resume=True) == {}
    _assert_same_parameters(model, weights)


def test_resume_with_a_tag_naming_a_missing_file_raises_instead_of_restarting(tmp_path):
    checkpointer = Checkpointer(_mlp(), str(tmp_path))
    checkpointer.save("model_0000009")
    os.remove(tmp_path / "model_0000009.pth")
    assert checkpointer.has_checkpoint()
    with pytest.raises(FileNotFoundError) as info:
        checkpointer.resume_or_load("", resume=True)
    assert f"names '{tmp_path / 'model_0000009.pth'}', which does not exist" in str(info.value)


# ------------------------------------------------------------------------------------------ saving


def test_non_main_process_and_empty_save_dir_write_nothing(tmp_path):
    assert Checkpointer(_mlp(), str(tmp_path), save_to_disk=False).save("m", iteration=1) is None
    assert os.listdir(tmp_path) == []
    assert Checkpointer(_mlp(), "").save("m") is None
    assert Checkpointer(_mlp(), "").get_all_checkpoint_files() == []


def test_save_refuses_data_that_would_not_load_and_keeps_the_previous_checkpoint(tmp_path):
    checkpointer = Checkpointer(_mlp(), str(tmp_path))
    checkpointer.save("good", iteration=1)
    with pytest.raises(TypeError, match=r"bad\.pth\['best'\] is a numpy\.float64"):
        checkpointer.save("bad", best=np.float64(0.5))
    assert sorted(os.listdir(tmp_path)) == ["good.pth", "last_checkpoint"]
    assert checkpointer.get_checkpoint_file() == str(tmp_path / "good.pth")


def test_save_rejects_clashing_names(tmp_path):
    model, optimizer, _ = _training_state(seed=0)
    checkpointer = Checkpointer(model, str(tmp_path), optimizer=optimizer)
    with pytest.raises(ValueError, match=r"\['optimizer'\] clash"):
        checkpointer.save("m", optimizer=1)
    with pytest.raises(ValueError, match="plain file name"):
        checkpointer.save("sub/m")
    with pytest.raises(ValueError, match="'optimizer' is already used"):
        checkpointer.add_checkpointable("optimizer", optimizer)
    with pytest.raises(TypeError, match=r"'lr' \(float\) has no state_dict\(\)"):
        Checkpointer(model, lr=0.1)


def test_get_all_checkpoint_files_lists_pth_files_sorted(tmp_path):
    checkpointer = Checkpointer(_mlp(), str(tmp_path))
    for name in ["model_0000019", "model_0000009", "model_final"]:
        checkpointer.save(name)
    (tmp_path / "notes.txt").write_text("x")
    assert checkpointer.get_all_checkpoint_files() == [
        str(tmp_path / "model_0000009.pth"),
        str(tmp_path / "model_0000019.pth"),
        str(tmp_path / "model_final.pth"),
    ]
    assert checkpointer.get_checkpoint_file() == str(tmp_path / "model_final.pth")
    checkpointer.tag_last_checkpoint("model_0000009.pth")
    assert checkpointer.get_checkpoint_file() == str(tmp_path / "model_0000009.pth")


# ------------------------------------------------------------------------------ PeriodicCheckpointer


def _names(tmp_path):
    return sorted(n for n in os.listdir(tmp_path) if n.endswith(".pth"))


def test_periodic_checkpointer_writes_exactly_the_due_files(tmp_path):
    periodic = PeriodicCheckpointer(Checkpointer(_mlp(), str(tmp_path)), period=3, max_iter=10)
    for iteration in range(10):
        periodic.step(iteration, epoch=iteration // 4)
    assert _names(tmp_path) == ["model_0000002.pth", "model_0000005.pth", "model_0000008.pth", "model_final.pth"]
    extra = Checkpointer(_mlp()).load(str(tmp_path / "model_0000005.pth"))
    assert extra == {"iteration": 5, "epoch": 1}
    assert Checkpointer(_mlp()).load(str(tmp_path / "model_final.pth")) == {"iteration": 9, "epoch": 2}
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"


def test_periodic_checkpointer_saves_both_files_when_the_last_iteration_is_due(tmp_path):
    periodic = PeriodicCheckpointer(Checkpointer(_mlp(), str(tmp_path)), period=5, max_iter=10, file_prefix="ckpt")
    for iteration in range(10):
        periodic.step(iteration)
    assert _names(tmp_path) == ["ckpt_0000004.pth", "ckpt_0000009.pth", "ckpt_final.pth"]


def test_max_to_keep_counts_the_runs_files_across_a_resume_and_spares_every_other_file(tmp_path):
    checkpointer = Checkpointer(_mlp(), str(tmp_path))
    checkpointer.save("model_ema_0000001")
    checkpointer.save("model_best")
    torch.save({"mine": torch.ones(1)}, tmp_path / "model_0000000.pth")  # the user's own files, named like ours
    torch.save({"mine": torch.ones(1)}, tmp_path / "model_0000002.pth")
    first = PeriodicCheckpointer(checkpointer, period=2, max_iter=20, max_to_keep=2)
    for iteration in range(6):
        first.step(iteration)
    others = ["model_0000000.pth", "model_0000002.pth", "model_best.pth", "model_ema_0000001.pth"]
    assert _names(tmp_path) == sorted(["model_0000003.pth", "model_0000005.pth", *others])

    # A resumed run: a new instance restores the names from the state that the checkpoint held.
    path = tmp_path / "state.pt"
    torch.save(first.state_dict(), path)
    resumed = PeriodicCheckpointer(Checkpointer(_mlp(), str(tmp_path)), period=2, max_iter=10, max_to_keep=2)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    resumed.step(6)
    resumed.step(7)
    assert _names(tmp_path) == sorted(["model_0000005.pth", "model_0000007.pth", *others])
    for iteration in range(8, 10):
        resumed.step(iteration)
    assert _names(tmp_path) == sorted(["model_0000007.pth", "model_0000009.pth", *others, "model_final.pth"])
    assert resumed.state_dict() == {"written": ["model_0000007.pth", "model_0000009.pth"]}


def test_max_to_keep_deletes_no_file_a_run_resumed_without_a_record_did_not_write(tmp_path):
    checkpointer = Checkpointer(_mlp(), str(tmp_path))
    for name in ("model_0000001", "model_0000003"):
        checkpointer.save(name)  # an earlier run's (or a checkpoint from before the record existed)
    periodic = PeriodicCheckpointer(checkpointer, period=2, max_to_keep=1)
    for iteration in range(4, 10):
        periodic.step(iteration)
    assert _names(tmp_path) == ["model_0000001.pth", "model_0000003.pth", "model_0000009.pth"]


def test_max_to_keep_one_keeps_the_tagged_newest_checkpoint(tmp_path):
    checkpointer = Checkpointer(_mlp(), str(tmp_path))
    periodic = PeriodicCheckpointer(checkpointer, period=1, max_to_keep=1)
    for iteration in range(3):
        periodic.step(iteration)
    assert _names(tmp_path) == ["model_0000002.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"


def test_max_to_keep_is_left_alone_on_non_main_processes(tmp_path):
    Checkpointer(_mlp(), str(tmp_path)).save("model_0000000")
    periodic = PeriodicCheckpointer(Checkpointer(_mlp(), str(tmp_path), save_to_disk=False), 1, max_to_keep=1)
    periodic.step(1)
    periodic.step(2)
    assert _names(tmp_path) == ["model_0000000.pth"]


def test_periodic_checkpointer_rejects_bad_arguments(tmp_path):
    checkpointer = Checkpointer(_mlp(), str(tmp_path))
    with pytest.raises(ValueError, match="period must be a positive number of iterations, got 0"):
        PeriodicCheckpointer(checkpointer, 0)
    with pytest.raises(ValueError, match="max_to_keep must be None .* got 0"):
        PeriodicCheckpointer(checkpointer, 1, max_to_keep=0)


def test_periodic_save_passes_through(tmp_path):
    periodic = PeriodicCheckpointer(Checkpointer(_mlp(), str(tmp_path)), period=100)
    assert periodic.save("model_manual", note="x") == str(tmp_path / "model_manual.pth")
    assert Checkpointer(_mlp()).load(str(tmp_path / "model_manual.pth")) == {"note": "x"}


@pytest.mark.parametrize(
    "make_tag, problem",
    [
        (lambda tag: tag.write_text(""), "is empty"),
        (lambda tag: tag.write_bytes(b"\x80\x04\x95\x00binary"), "is not a text file"),
        (lambda tag: tag.mkdir(), "is a folder, not the tag file"),
        (lambda tag: tag.write_text("../elsewhere/model_final.pth"), "names '../elsewhere/model_final.pth', which is not a file in"),
        (lambda tag: tag.write_text("/tmp/model_final.pth"), "names '/tmp/model_final.pth', which is not a file in"),
    ],
    ids=["empty", "binary", "a folder", "a relative path outside", "an absolute path"],
)
def test_a_broken_last_checkpoint_tag_is_a_clear_error_naming_it_and_never_a_fresh_start(tmp_path, make_tag, problem):
    model = nn.Linear(2, 2)
    Checkpointer(model, str(tmp_path)).save("model_0000009")
    tag = tmp_path / "last_checkpoint"
    if tag.is_file():
        tag.unlink()
    make_tag(tag)
    checkpointer = Checkpointer(nn.Linear(2, 2), str(tmp_path))
    for call in (checkpointer.has_checkpoint, lambda: checkpointer.resume_or_load("", resume=True)):
        with pytest.raises(CheckpointError) as info:
            call()
        assert str(info.value).startswith(f"The last-checkpoint tag {tag} {problem}")
        assert "the folder holds: ['model_0000009.pth']" in str(info.value)
