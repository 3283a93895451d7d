from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import Config, ConfigError, load_config, parse_config


def test_empty_file_gives_defaults() -> None:
    assert parse_config("") == Config()


def test_unknown_key_is_named_with_hint() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config("[core]\ndata_dri = '/tmp'\n")
    assert err.value.path == "core.data_dri"
    assert "did you mean 'data_dir'" in str(err.value)


def test_bad_type_is_named() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config("[core]\nlog_level = 3\n")
    assert err.value.path == "core.log_level"


def test_literal_choices_listed() -> None:
    with pytest.raises(ConfigError, match="'loud' is not one of"):
        parse_config("[core]\nlog_level = 'loud'\n")


def test_invalid_toml_reports_source() -> None:
    with pytest.raises(ConfigError, match="is not valid TOML"):
        parse_config("[core\n", "x.toml")


def test_missing_file_gives_hint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="gateway.example.toml"):
        load_config(tmp_path / "nope.toml")


def test_values_are_decoded(tmp_path: Path) -> None:
    f = tmp_path / "g.toml"
    f.write_text("[core]\ndata_dir = '/srv/gw'\nlog_format = 'json'\n")
    cfg = load_config(f)
    assert cfg.core.data_dir == Path("/srv/gw")
    assert cfg.core.log_format == "json"


def test_example_config_is_valid_and_matches_defaults() -> None:
    example = Path(__file__).parents[1] / "config" / "gateway.example.toml"
    assert load_config(example) == Config()
