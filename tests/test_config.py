"""Config resolution: precedence, types, unknown keys, cross-field rules."""

import json

import pytest

from utils.config import DEFAULT_PRESET, PRESETS, SECTIONS, Config, resolve
from utils.errors import UserError

# What --task mlm and --task classify change from the dataclass defaults.
MLM = {"task": "mlm", "model.dropout": 0.1, "train.batch_size": 16, "train.min_lr_ratio": 0.1}
CLASSIFY = {
    "task": "classify",
    "data.val_fraction": 0.15,
    "data.test_fraction": 0.15,
    "model.dropout": 0.1,
    "train.batch_size": 16,
    "train.epochs": 20,
    "train.min_lr_ratio": 0.1,
    "train.early_stopping_patience": 4,
    "train.checkpoint_every": 0,
}


def changed(config: Config) -> dict[str, object]:
    """The settings of `config` that differ from the dataclass defaults, as {"section.key": v}."""
    default, mine = Config().to_dict(), config.to_dict()
    out = {"task": mine["task"]} if mine["task"] != default["task"] else {}
    for section in SECTIONS:
        for key, value in mine[section].items():
            if value != default[section][key]:
                out[f"{section}.{key}"] = value
    return out


def test_task_defaults_come_before_the_preset():
    """No --preset is `small`: the dataclass defaults; a task's own defaults go under the preset."""
    assert DEFAULT_PRESET == "small"
    assert changed(resolve(DEFAULT_PRESET, None, {})) == {}
    assert changed(resolve(DEFAULT_PRESET, None, {}, task="mlm")) == MLM
    assert changed(resolve(DEFAULT_PRESET, None, {}, task="classify")) == CLASSIFY
    # The tiny preset sets batch_size, epochs, dropout and checkpoint_every too: its values
    # win. The held-out shares, early stopping and learning-rate decay stay classify's.
    assert changed(resolve("tiny", None, {}, task="classify")) == {
        **changed(resolve("tiny", None, {})),
        "task": "classify",
        "data.val_fraction": 0.15,
        "data.test_fraction": 0.15,
        "train.min_lr_ratio": 0.1,
        "train.early_stopping_patience": 4,
    }


def test_the_task_in_a_config_file_brings_its_defaults(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("task: classify\n")
    assert changed(resolve(DEFAULT_PRESET, str(cfg_file), {})) == CLASSIFY
    # The command line's --task beats the file's, and brings its own defaults alone.
    assert changed(resolve(DEFAULT_PRESET, str(cfg_file), {}, task="mlm")) == MLM


def test_precedence_preset_then_file_then_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model:\n  n_layers: 3\n  d_model: 64\ntrain:\n  lr: 0.5\n")
    config = resolve("tiny", str(cfg_file), {"model.n_layers": "5", "train.xla": "false"})
    assert config.model.n_layers == 5  # flag beats file
    assert config.model.d_model == 64  # file beats preset
    assert config.model.seq_len == PRESETS["tiny"]["model"]["seq_len"]  # preset beats default
    assert config.train.lr == 0.5 and config.train.xla is False


def test_json_file_and_types(tmp_path):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"train": {"epochs": 2, "lr": 1}, "data": {"lowercase": True}}))
    config = resolve("small", str(cfg_file), {})
    assert config.train.epochs == 2 and config.train.lr == 1.0 and config.data.lowercase is True


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"model.n_layer": "2"},
            "unknown key 'model.n_layer' (did you mean 'model.n_layers'?); valid keys: model.d_ff",
        ),
        ({"modle.n_layers": "2"}, "unknown key 'modle.n_layers'"),
        ({"train.epochs": "two"}, "command line: train.epochs: expected an integer, got 'two'"),
        ({"train.xla": "maybe"}, "expected true or false, got 'maybe'"),
        (
            {"train.optimizer": "lion"},
            "train.optimizer must be one of adamw, adam, sgd, adagrad, adadelta; got 'lion'",
        ),
        (
            {"model.d_model": "100", "model.n_heads": "3"},
            "model.d_model (100) must be divisible by model.n_heads (3)",
        ),
        ({"train.batch_size": "0"}, "train.batch_size must be > 0; got 0"),
        ({"model.dropout": "1.5"}, "model.dropout must be in [0, 1); got 1.5"),
        ({"data.val_fraction": "0.9"}, "data.val_fraction must be in (0, 0.5)"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(UserError) as e:
        resolve("small", None, overrides)
    assert message in str(e.value)


def test_bad_config_files(tmp_path):
    wrong_type = tmp_path / "wrong.yaml"
    wrong_type.write_text("train:\n  batch_size: [1, 2]\n")
    with pytest.raises(
        UserError, match=r"wrong.yaml: train.batch_size: expected an integer, got \[1, 2\]"
    ):
        resolve("small", str(wrong_type), {})
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("optim:\n  lr: 1\n")
    with pytest.raises(
        UserError, match="unknown key 'optim'; valid keys: data, model, parallel, task, train"
    ):
        resolve("small", str(unknown), {})
    not_a_mapping = tmp_path / "list.yaml"
    not_a_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="expected a mapping of sections"):
        resolve("small", str(not_a_mapping), {})
    broken = tmp_path / "broken.json"
    broken.write_text("{nope")
    with pytest.raises(UserError, match=r"broken\.json: not valid JSON"):
        resolve("small", str(broken), {})
    with pytest.raises(UserError, match="does not exist"):
        resolve("small", str(tmp_path / "missing.yaml"), {})


def test_unknown_preset():
    with pytest.raises(UserError, match="unknown preset 'huge'; choose from tiny, small"):
        resolve("huge", None, {})
