import os
import re
import textwrap

import pytest
from yacs.config import CfgNode as YacsCfgNode

from trainkit.config import CfgNode, ConfigKeyError, get_cfg


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_get_cfg_returns_an_independent_copy_of_the_defaults():
    cfg = get_cfg()
    cfg.SOLVER.BASE_LR = 123.0
    cfg.MODEL.MLP.HIDDEN_DIMS.append(7)
    fresh = get_cfg()
    assert isinstance(fresh, CfgNode) and isinstance(fresh.SOLVER.CLIP_GRADIENTS, CfgNode)
    assert fresh.SOLVER.BASE_LR == 0.001
    assert fresh.MODEL.MLP.HIDDEN_DIMS == [128, 128]


def test_base_chain_of_three_files_in_different_folders(tmp_path, monkeypatch):
    write(tmp_path / "base" / "Base.yaml", """
        SOLVER:
          BASE_LR: 0.1
          MAX_ITER: 100
          STEPS: (50,)
        MODEL:
          MLP:
            HIDDEN_DIMS: [32]
        """)
    write(tmp_path / "mid" / "Mid.yaml", """
        _BASE_: ../base/Base.yaml
        SOLVER:
          BASE_LR: 0.05
          OPTIMIZER: AdamW
        """)
    leaf = write(tmp_path / "exp" / "deep" / "Exp.yaml", """
        _BASE_: ../../mid/Mid.yaml
        SOLVER:
          BASE_LR: 0.02
        OUTPUT_DIR: out/exp
        """)
    # Paths are relative to the including file, not to the working directory.
    monkeypatch.chdir(tmp_path / "exp")
    cfg = get_cfg()
    cfg.merge_from_file(os.path.relpath(leaf))
    assert cfg.SOLVER.BASE_LR == 0.02  # leaf overrides mid overrides base
    assert cfg.SOLVER.OPTIMIZER == "AdamW"  # from mid
    assert cfg.SOLVER.MAX_ITER == 100 and cfg.SOLVER.STEPS == (50,)  # from base
    assert cfg.MODEL.MLP.HIDDEN_DIMS == [32]
    assert cfg.OUTPUT_DIR == "out/exp"
    assert cfg.SOLVER.GAMMA == 0.1  # untouched default


def test_base_may_be_an_absolute_path(tmp_path):
    base = write(tmp_path / "a" / "Base.yaml", "SOLVER:\n  MAX_ITER: 7\n")
    child = write(tmp_path / "b" / "child.yaml", f"_BASE_: {base}\nSEED: 3\n")
    cfg = get_cfg()
    cfg.merge_from_file(child)
    assert (cfg.SOLVER.MAX_ITER, cfg.SEED) == (7, 3)


def test_base_cycle_names_every_file_of_the_cycle(tmp_path):
    a = write(tmp_path / "a.yaml", "_BASE_: sub/b.yaml\n")
    b = write(tmp_path / "sub" / "b.yaml", "_BASE_: ../c.yaml\n")
    write(tmp_path / "c.yaml", "_BASE_: a.yaml\n")
    cfg = get_cfg()
    with pytest.raises(ValueError) as info:
        cfg.merge_from_file(a)
    c = str(tmp_path / "c.yaml")
    assert str(info.value) == f"_BASE_ cycle: {a} -> {b} -> {c} -> {a}; remove one of these _BASE_ keys"


def test_file_that_names_itself_as_base_is_a_cycle(tmp_path):
    a = write(tmp_path / "a.yaml", "_BASE_: ./a.yaml\n")
    with pytest.raises(ValueError, match=re.escape(f"_BASE_ cycle: {a} -> {a};")):
        get_cfg().merge_from_file(a)


def test_base_must_be_a_path_string(tmp_path):
    a = write(tmp_path / "a.yaml", "_BASE_: [x.yaml, y.yaml]\n")
    with pytest.raises(ValueError, match=re.escape(f"_BASE_ in {a} must be one path string, got ['x.yaml', 'y.yaml']")):
        get_cfg().merge_from_file(a)


def test_unknown_key_in_file_names_the_key_and_the_nearest_valid_one(tmp_path):
    path = write(tmp_path / "x.yaml", "SOLVER:\n  BASE_LRR: 0.1\n")
    with pytest.raises(KeyError) as info:
        get_cfg().merge_from_file(path)
    assert isinstance(info.value, ConfigKeyError)
    assert str(info.value) == (
        f"Non-existent config key: SOLVER.BASE_LRR (did you mean SOLVER.BASE_LR?), set in {path}"
    )


def test_unknown_key_on_command_line_names_the_nearest_valid_one():
    cfg = get_cfg()
    with pytest.raises(KeyError) as info:
        cfg.merge_from_list(["MODEL.MLP.HIDEN_DIMS", "[1]"])
    assert str(info.value).startswith(
        "Non-existent config key: MODEL.MLP.HIDEN_DIMS (did you mean MODEL.MLP.HIDDEN_DIMS?)"
    )
    with pytest.raises(KeyError, match=re.escape("SOLVER.BASE_LR.X (did you mean SOLVER.BASE_LR?)")):
        cfg.merge_from_list(["SOLVER.BASE_LR.X", "1"])
    with pytest.raises(KeyError, match=re.escape("Non-existent config key: ZZZ (no similar key; ")):
        cfg.merge_from_list(["ZZZ", "1"])


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("SOLVER.BASE_LR", "abc", "Config key SOLVER.BASE_LR expects type float, got 'abc' (str)"),
        ("SOLVER.MAX_ITER", "1e4", "Config key SOLVER.MAX_ITER expects type int, got 10000.0 (float)"),
        ("SOLVER.MAX_ITER", "True", "Config key SOLVER.MAX_ITER expects type int, got True (bool)"),
        ("SOLVER.NESTEROV", "1", "Config key SOLVER.NESTEROV expects type bool, got 1 (int)"),
        ("SOLVER.STEPS", "5", "Config key SOLVER.STEPS expects type tuple, got 5 (int)"),
        (
            "MODEL.MLP.HIDDEN_DIMS",
            "[64, 'x']",
            "Config key MODEL.MLP.HIDDEN_DIMS expects a list of int, got [64, 'x'] in the command-line "
            "overrides: 'x' is a str",
        ),
        ("SOLVER.CLIP_GRADIENTS", "3", "Config key SOLVER.CLIP_GRADIENTS is a group of keys, got 3"),
        ("SOLVER.GAMMA", "{'A': 1}", "Config key SOLVER.GAMMA is a single value (0.1), got a mapping {'A': 1}"),
    ],
)
def test_wrong_value_type_names_key_value_and_expected_type(key, value, message):
    with pytest.raises(TypeError) as info:
        get_cfg().merge_from_list([key, value])
    assert str(info.value).startswith(message)


def test_wrong_type_in_file_names_the_file(tmp_path):
    path = write(tmp_path / "x.yaml", "SOLVER:\n  WEIGHT_DECAY: high\n")
    with pytest.raises(TypeError) as info:
        get_cfg().merge_from_file(path)
    assert str(info.value) == (
        f"Config key SOLVER.WEIGHT_DECAY expects type float, got 'high' (str) in {path}; "
        "use a value like the current one, 0.0001"
    )


def test_accepted_conversions():
    cfg = get_cfg()
    cfg.merge_from_list(
        ["SOLVER.BASE_LR", "1", "SOLVER.STEPS", "[10, 20]", "MODEL.MLP.HIDDEN_DIMS", "(8, 4)",
         "SOLVER.WEIGHT_DECAY_BIAS", "0", "MODEL.WEIGHTS", "None"]
    )
    assert cfg.SOLVER.BASE_LR == 1.0 and type(cfg.SOLVER.BASE_LR) is float
    assert cfg.SOLVER.STEPS == (10, 20)
    assert cfg.MODEL.MLP.HIDDEN_DIMS == [8, 4]
    assert cfg.SOLVER.WEIGHT_DECAY_BIAS == 0  # the default is None: any valid type is accepted
    assert cfg.MODEL.WEIGHTS == "None"  # a string key always gets a string


def test_command_line_strings_use_yacs_literal_eval_rules():
    cfg = get_cfg()
    cfg.merge_from_list(
        ["SOLVER.OPTIMIZER", "AdamW", "SOLVER.BASE_LR", "2e-3", "SOLVER.NESTEROV", "True",
         "OUTPUT_DIR", "2024", "MODEL.DEVICE", "'cpu'", "DATASETS.TRAIN", "('digits_train',)",
         "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 5]
    )
    assert cfg.SOLVER.OPTIMIZER == "AdamW"
    assert cfg.SOLVER.BASE_LR == 0.002
    assert cfg.SOLVER.NESTEROV is True
    assert cfg.OUTPUT_DIR == "2024"
    assert cfg.MODEL.DEVICE == "cpu"
    assert cfg.DATASETS.TRAIN == ("digits_train",)
    assert cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE == 5.0


def test_yaml_exponent_without_dot_is_read_as_a_number(tmp_path):
    # PyYAML reads 1e-3 as a string; yacs' literal-eval turns it into a float.
    path = write(tmp_path / "x.yaml", "SOLVER:\n  BASE_LR: 1e-3\n  STEPS: (100, 200)\n")
    cfg = get_cfg()
    cfg.merge_from_file(path)
    assert cfg.SOLVER.BASE_LR == 0.001 and cfg.SOLVER.STEPS == (100, 200)


def test_merge_from_list_with_odd_number_of_items_says_so():
    with pytest.raises(ValueError) as info:
        get_cfg().merge_from_list(["SOLVER.BASE_LR", "0.1", "SOLVER.MAX_ITER"])
    assert str(info.value) == (
        "merge_from_list needs KEY VALUE pairs, got an odd number of items (3): "
        "['SOLVER.BASE_LR', '0.1', 'SOLVER.MAX_ITER']; the key 'SOLVER.MAX_ITER' has no value"
    )


def test_missing_file_names_the_path(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(FileNotFoundError) as info:
        get_cfg().merge_from_file(missing)
    assert str(info.value) == f"Config file not found: {missing}"


def test_missing_base_names_the_path_and_the_including_file(tmp_path):
    child = write(tmp_path / "exp" / "child.yaml", "_BASE_: ../Base-Missing.yaml\n")
    with pytest.raises(FileNotFoundError) as info:
        get_cfg().merge_from_file(child)
    missing = str(tmp_path / "Base-Missing.yaml")
    assert str(info.value) == f"Config file not found: {missing} (the _BASE_ of {child})"


def test_unreadable_file_names_the_path(tmp_path):
    folder = tmp_path / "a_folder.yaml"
    folder.mkdir()
    with pytest.raises(IsADirectoryError) as info:
        get_cfg().merge_from_file(str(folder))
    assert str(info.value) == f"Cannot read config file {folder}: Is a directory"


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "SOLVER:\n  BASE_LR: 0.1\n   MAX_ITER: [1, 2\n")
    with pytest.raises(ValueError) as info:
        get_cfg().merge_from_file(path)
    message = str(info.value)
    assert message.startswith(f"Malformed YAML in config file {path}:\n")
    assert f'in "{path}", line 3, column 12' in message


def test_binary_file_is_named_as_not_text(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"SEED: \xff\xfe\n")
    with pytest.raises(ValueError, match=re.escape(f"Config file {path} is not UTF-8 text: ")):
        get_cfg().merge_from_file(str(path))


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path / "list.yaml", "- SOLVER\n- MODEL\n")
    with pytest.raises(ValueError) as info:
        get_cfg().merge_from_file(path)
    assert str(info.value) == f"Config file {path} must hold a mapping of KEY: value at its top level, got a list"


def test_empty_file_changes_nothing(tmp_path):
    cfg = get_cfg()
    cfg.merge_from_file(write(tmp_path / "empty.yaml", "\n"))
    assert cfg == get_cfg()


def test_failed_merge_leaves_the_config_unchanged(tmp_path):
    path = write(tmp_path / "x.yaml", "SEED: 5\nSOLVER:\n  BASE_LR: 0.5\n  MAX_ITER: many\n")
    cfg = get_cfg()
    solver = cfg.SOLVER
    with pytest.raises(TypeError):
        cfg.merge_from_file(path)
    assert cfg == get_cfg()
    cfg.merge_from_list(["SOLVER.BASE_LR", "0.5"])
    assert solver.BASE_LR == 0.5  # sub-nodes held by callers stay the live ones


def test_frozen_config_refuses_merges():
    cfg = get_cfg()
    cfg.freeze()
    with pytest.raises(AttributeError, match=r"frozen config; call cfg.defrost\(\) first"):
        cfg.merge_from_list(["SEED", "1"])
    cfg.defrost()
    cfg.merge_from_list(["SEED", "1"])
    assert cfg.SEED == 1


def test_merge_from_other_cfg_checks_keys():
    cfg = get_cfg()
    cfg.merge_from_other_cfg(YacsCfgNode({"SOLVER": {"MAX_ITER": 9}}))
    assert cfg.SOLVER.MAX_ITER == 9
    with pytest.raises(KeyError, match=re.escape("SOLVER.MAX_ITR (did you mean SOLVER.MAX_ITER?), set in another")):
        cfg.merge_from_other_cfg(YacsCfgNode({"SOLVER": {"MAX_ITR": 9}}))


def test_dump_to_writes_yaml_that_loads_back_equal(tmp_path):
    cfg = get_cfg()
    cfg.merge_from_list(
        ["SOLVER.STEPS", "(10, 20)", "OUTPUT_DIR", "2024", "MODEL.WEIGHTS", "0.5", "SOLVER.WEIGHT_DECAY_BIAS", "0.0"]
    )
    path = cfg.dump_to(str(tmp_path / "out"))
    assert path == str(tmp_path / "out" / "config.yaml")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.yaml"]
    with open(path) as f:
        text = f.read()
    assert text == cfg.dump()
    assert "STEPS:\n  - 10\n  - 20\n" in text
    loaded = get_cfg()
    loaded.merge_from_file(path)
    assert loaded == cfg
    # Plain yacs reads the text too.
    assert YacsCfgNode.load_cfg(text).SOLVER.STEPS == [10, 20]
