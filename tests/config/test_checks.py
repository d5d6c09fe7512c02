"""The ranges of the built-in config keys, and a key given twice in one YAML mapping."""
import logging
from pathlib import Path

import pytest

from trainkit.config import get_cfg
from trainkit.config.checks import check_config_values
from trainkit.engine import DefaultTrainer


def _cfg(*opts):
    cfg = get_cfg()
    cfg.merge_from_file(str(Path(__file__).resolve().parents[2] / "configs" / "digits" / "mlp.yaml"))
    cfg.merge_from_list(list(opts))
    return cfg


def test_every_default_and_the_shipped_config_are_in_range():
    check_config_values(get_cfg())
    check_config_values(_cfg())


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("TEST.EVAL_PERIOD", -1, "a number of iterations >= 0 (0: only after the last iteration)"),
        ("SOLVER.MAX_ITER", 0, "a number of iterations >= 1"),
        ("SOLVER.BASE_LR", -0.1, "a finite number >= 0"),
        ("SOLVER.MOMENTUM", 1.5, "a number in [0, 1)"),
        ("MODEL.MLP.DROPOUT", 1.0, "a probability in [0, 1)"),
        ("SOLVER.STEPS", (200, 100), "increasing iterations >= 0"),
        ("SOLVER.AMP.PRECISION", "fp8", "'float16' or 'bfloat16'"),
        ("SOLVER.LOG_PERIOD", 0, "a number of iterations >= 1"),
        ("DATALOADER.NUM_WORKERS", -1, "a number of processes >= 0"),
        ("SOLVER.CHECKPOINT_PERIOD", 0, "a number of iterations >= 1"),
        ("DIST.TIMEOUT_S", 0, "a number of seconds > 0"),
    ],
)
def test_a_value_out_of_its_range_is_an_error_naming_the_key_the_value_and_the_range(tmp_path, key, value, words):
    cfg = _cfg(key, value, "OUTPUT_DIR", str(tmp_path))
    with pytest.raises(ValueError) as info:
        DefaultTrainer(cfg)
    shown = list(value) if isinstance(value, tuple) else value  # yacs stores tuples as given
    assert str(info.value) in (f"Config key {key} is {value!r}, out of its range: it must be {words}.",
                               f"Config key {key} is {shown!r}, out of its range: it must be {words}.")


def test_values_that_train_but_are_probably_a_mistake_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="trainkit"):
        check_config_values(_cfg("SOLVER.BASE_LR", 0.0, "SOLVER.MAX_ITER", 100, "SOLVER.STEPS", (50, 100),
                                 "SOLVER.LR_SCHEDULER_NAME", "WarmupMultiStepLR", "SOLVER.WARMUP_ITERS", 200))
    assert "SOLVER.BASE_LR is 0: the weights will not change." in caplog.text
    assert "SOLVER.STEPS [100] are not before SOLVER.MAX_ITER (100): the LR never decays there." in caplog.text
    assert "SOLVER.WARMUP_ITERS (200) is more than SOLVER.MAX_ITER (100): training ends during warm-up." in caplog.text


def test_a_key_given_twice_in_one_yaml_mapping_is_an_error_naming_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("SOLVER:\n  BASE_LR: 0.1\n  MAX_ITER: 10\n  BASE_LR: 0.5\n")
    with pytest.raises(ValueError) as info:
        get_cfg().merge_from_file(str(path))
    message = str(info.value)
    assert message.startswith(f"Malformed YAML in config file {path}:")
    assert "found the key 'BASE_LR' twice (first on line 2); keep one of them" in message
    assert f'in "{path}", line 4' in message


def test_an_unknown_writer_in_writers_is_an_error_that_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown writer 'jsno' \(did you mean 'json'\?\); the known writers are "
                                         r"\['json', 'tensorboard', 'console', 'csv', 'mlflow', 'wandb'\]"):
        check_config_values(_cfg("WRITERS", '["jsno", "console"]'))
    with pytest.raises(ValueError, match=r"WRITERS names \['csv'\] more than once"):
        check_config_values(_cfg("WRITERS", '["csv", "json", "csv"]'))
    check_config_values(_cfg("WRITERS", '["csv", "mlflow", "wandb"]'))  # known, even where not installed
