"""RunDir.load_config: the one typed way to read a run's config, checked as the command line is."""

from __future__ import annotations

import json

import pytest

from utils.config import Config, resolve
from utils.errors import UserError
from utils.run_dir import RunDir


def _write(tmp_path, config: dict) -> RunDir:
    run = RunDir(tmp_path)
    run.write_config({"preset": "tiny", "config": config, "data": {"labels": ["a", "b"]}})
    return run


def test_load_config_gives_back_the_config_that_was_saved(tmp_path):
    saved = resolve("tiny", None, {"model.d_model": "48", "train.lr": "0.002"}, "classify")
    loaded = _write(tmp_path, saved.to_dict()).load_config()
    assert isinstance(loaded, Config)
    assert loaded == saved
    assert loaded.to_dict() != Config().to_dict()  # the saved values, not the defaults


def test_an_older_config_without_newer_keys_loads_with_their_defaults(tmp_path):
    saved = resolve("tiny", None, {}, "causal_lm").to_dict()
    del saved["parallel"]  # written before the parallel section existed
    assert _write(tmp_path, saved).load_config().parallel.tensor == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c: c["model"].update(d_modle=64),
            "unknown key 'model.d_modle' (did you mean 'model.d_model'?)",
        ),
        (lambda c: c["train"].update(lr="fast"), "train.lr"),
        (
            lambda c: c["model"].update(d_model=50, n_heads=4),
            "model.d_model (50) must be divisible",
        ),
        (lambda c: c.update(task="translate"), "task must be one of"),
    ],
)
def test_a_bad_config_json_is_a_user_error_naming_the_file_and_key(tmp_path, change, message):
    config = resolve("tiny", None, {}, "causal_lm").to_dict()
    change(config)
    run = _write(tmp_path, config)
    with pytest.raises(UserError) as error:
        run.load_config()
    assert message in str(error.value)
    if "must be divisible" not in message:  # a rule between keys names the keys alone
        assert str(run.config) in str(error.value)


def test_a_damaged_or_foreign_config_json_is_a_user_error(tmp_path):
    run = RunDir(tmp_path)
    run.config.write_text("{not json")
    with pytest.raises(UserError, match=r"config\.json: not valid JSON \(line 1"):
        run.load_config()
    run.config.write_text(json.dumps({"something": "else"}))
    with pytest.raises(UserError, match='no "config" mapping'):
        run.load_config()
    with pytest.raises(UserError, match="not a run directory"):
        RunDir(tmp_path / "missing").load_config()
