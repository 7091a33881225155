"""The config model's errors and secrets: an error names the setting and the fix (exit code 2, no
traceback), and a secret never shows in a message, a log or `topoflow config`, whatever its shape."""

from __future__ import annotations

import json
import logging

import pytest
import yaml

from topoflow.cli import main
from topoflow.config import load_config
from topoflow.errors import ConfigError

SECRET = "storage.s3_secret_access_key"
# plain text, number-like, mapping-like, alias-like, unbalanced
SHAPES = ["s3cr3t-plain-VALUE", "12345", "{a: b}", "*abc", "[abc"]
_AWS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def _cli(capsys, caplog, *argv: str) -> tuple[int, str, str]:
    """Exit code, stdout and all the command printed or logged, run with -v (INFO logging)."""
    caplog.set_level(logging.INFO)
    rc = main([argv[0], "-v", *argv[1:]])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, out + err + caplog.text


def _shows(raw: str, text: str) -> bool:
    """Whether ``text`` shows the secret ``raw``: as written, without its YAML sign (*abc, [abc), or as
    pydantic quotes an input."""
    return raw in text or raw.strip("*[{}") in text or "input_value" in text


def _write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("raw", SHAPES)
def test_secret_given_by_set_is_taken_as_written_and_never_shown(raw, capsys, caplog):
    assert load_config(None, [f"{SECRET}={raw}"]).storage.s3_secret_access_key.get_secret_value() == raw
    rc, out, text = _cli(capsys, caplog, "config", "--set", f"{SECRET}={raw}")
    assert rc == 0 and yaml.safe_load(out)["storage"]["s3_secret_access_key"] == "**********"
    assert not _shows(raw, text)
    rc, _, text = _cli(capsys, caplog, "config", "--set", f"{SECRET}={raw}", "--set", "train.epochs=0")
    assert rc == 2 and "train.epochs" in text and "(got 0)" in text and not _shows(raw, text)


@pytest.mark.parametrize("raw", SHAPES)
def test_quoted_secret_in_config_file_is_taken_as_written_and_never_shown(raw, tmp_path, capsys, caplog):
    path = _write(tmp_path, f"storage:\n  s3_secret_access_key: {json.dumps(raw)}\ntrain:\n  epochs: 0\n")
    rc, _, text = _cli(capsys, caplog, "config", "--config", str(path))
    assert rc == 2 and "train.epochs" in text and not _shows(raw, text)
    secret = load_config(path, ["train.epochs=1"]).storage.s3_secret_access_key
    assert secret.get_secret_value() == raw


@pytest.mark.parametrize("raw", ["s3cr3t-plain-VALUE", "12345", "0123"])
def test_plain_scalar_secret_in_config_file_is_taken_as_written(raw, tmp_path, capsys, caplog):
    """YAML alone would read 12345 as a number (which pydantic rejects, quoting it) and 0123 as 83."""
    path = _write(tmp_path, f"storage:\n  s3_secret_access_key: {raw}\n")
    assert load_config(path).storage.s3_secret_access_key.get_secret_value() == raw
    rc, _, text = _cli(capsys, caplog, "config", "--config", str(path))
    assert rc == 0 and not _shows(raw, text)


@pytest.mark.parametrize("raw, message", [
    ("{a: b}", "storage.s3_secret_access_key: Input should be a valid string (a secret: value not shown)"),
    ("*abc", "config file is not valid YAML: line 2, column 25: found undefined alias"),
    ("[abc", "config file is not valid YAML: line 3, column 1: expected ',' or ']'"),
])
def test_unquoted_secret_that_is_not_text_is_an_error_that_does_not_show_it(raw, message, tmp_path, capsys, caplog):
    path = _write(tmp_path, f"storage:\n  s3_secret_access_key: {raw}\n")
    rc, _, text = _cli(capsys, caplog, "config", "--config", str(path))
    assert rc == 2 and message in text and f"in file {path}" in text
    assert not _shows(raw, text)


@pytest.mark.parametrize("raw", SHAPES)
def test_mistyped_secret_setting_does_not_show_the_value(raw, capsys, caplog):
    rc, _, text = _cli(capsys, caplog, "config", "--set", f"storage.s3_secret_acess_key={raw}")
    assert rc == 2 and "storage.s3_secret_acess_key" in text and not _shows(raw, text)
    rc, _, text = _cli(capsys, caplog, "config", "--set", f"storage.s3_secret_access_key:{raw}")
    assert rc == 2 and "expected section.key=value" in text and not _shows(raw, text)


def test_malformed_set_value_names_the_setting_and_the_fix(capsys):
    assert main(["config", "--set", "train.epochs=[1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --set train.epochs: the value is not valid YAML\n")
    assert "quote it" in err and "plain number" in err and "Traceback" not in err


@pytest.mark.parametrize("setting, message", [
    ("train.epoch", "unknown setting train.epoch; did you mean train.epochs?"),
    ("trian.epochs", "unknown setting trian; did you mean train?"),
    ("storage.timeout", "unknown setting storage.timeout; did you mean storage.timeout_s?"),
    ("train.zzz", "unknown setting train.zzz; `topoflow config` lists them all"),
])
def test_unknown_setting_names_the_closest_valid_one(setting, message, tmp_path, capsys):
    assert main(["config", "--set", f"{setting}=3"]) == 2
    assert message in capsys.readouterr().err
    section, key = setting.split(".")
    path = _write(tmp_path, yaml.safe_dump({section: {key: 3}}))
    assert main(["config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and f"in file {path}" in err and "Traceback" not in err


def test_config_says_which_settings_come_from_the_environment(monkeypatch, capsys):
    for var in _AWS:
        monkeypatch.delenv(var, raising=False)
    assert main(["config"]) == 0
    storage = yaml.safe_load(capsys.readouterr().out)["storage"]
    assert storage["s3_access_key_id"] is storage["s3_secret_access_key"] is storage["s3_endpoint_url"] is None

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key-VALUE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-VALUE")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env-endpoint-VALUE:8333")
    overrides = [f"{SECRET}=cfg-secret-VALUE"]
    assert main(["config", "--set", *overrides]) == 0
    out = capsys.readouterr().out
    storage = yaml.safe_load(out)["storage"]
    assert storage["s3_access_key_id"] == "<from environment AWS_ACCESS_KEY_ID>"
    assert storage["s3_secret_access_key"] == "**********"
    assert storage["s3_endpoint_url"] == "<from environment AWS_ENDPOINT_URL>"
    assert "VALUE" not in out
    opts = load_config(None, overrides).storage.s3_options()  # and that is where the values come from
    assert (opts["key"], opts["secret"]) == ("env-key-VALUE", "cfg-secret-VALUE")
    assert opts["endpoint_url"] == "http://env-endpoint-VALUE:8333"


@pytest.mark.parametrize("overrides, message", [
    (["ingest.on_bad_file=sometimes"], "ingest.on_bad_file: Input should be 'fail' or 'skip' (got 'sometimes')"),
    (["ingest.datasets={higgs: [x.root]}"], "unknown class name"),
    (["spark.nonsense=1"], "nonsense"),
    (["novalue"], "section.key=value"),
])
def test_invalid_settings_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)
