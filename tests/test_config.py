from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from appliance.core.config import ConfigError, check_problems, load_settings
from testsupport.common import PYTHON, ROOT


def test_defaults_without_file(clean_env, tmp_path: Path) -> None:
    s = load_settings(None)
    assert s.dicom.port == 11112
    assert s.dicom.ae_title == "APPLIANCE"
    assert str(s.state_dir) == "/var/lib/appliance"


def test_file_and_env_override(clean_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text('state_dir = "/tmp/x"\n[dicom]\nport = 2000\nae_title = "FROMFILE"\n')
    monkeypatch.setenv("APPLIANCE_DICOM__PORT", "3000")
    s = load_settings(cfg)
    assert s.dicom.port == 3000  # env beats file
    assert s.dicom.ae_title == "FROMFILE"
    assert str(s.state_dir) == "/tmp/x"


@pytest.mark.parametrize(
    "toml, key",
    [
        ("[dicom]\nport = 70000\n", "dicom.port"),
        ("[dicom]\nae_title = 'THIS_TITLE_IS_TOO_LONG'\n", "dicom.ae_title"),
        ("[dicom]\nportt = 1\n", "dicom.portt"),
        ("[engines]\nbackend = 'cuda'\n", "engines.backend"),
    ],
)
def test_invalid_values_name_the_key(clean_env, tmp_path: Path, toml: str, key: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert any(p.startswith(key) for p in err.value.problems), err.value.problems


def test_bad_toml_and_missing_explicit_file(clean_env, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[dicom\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")


def test_check_problems_semantic(clean_env, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'state_dir = "{tmp_path}"\n[dicom]\nallowlist_enabled = true\n[cloud]\nenabled = true\n')
    problems = check_problems(load_settings(cfg))
    assert any(p.startswith("dicom.allowed_callers") for p in problems)
    assert any(p.startswith("cloud.hub_hostname") for p in problems)
    assert not any(p.startswith("api.") for p in problems)


def test_the_dashboard_with_half_or_an_unreadable_certificate_is_a_problem(clean_env, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'state_dir = "{tmp_path}"\n[api]\nenabled = true\ntls_cert_file = "{tmp_path}/nope.pem"\n')
    problems = check_problems(load_settings(cfg))
    assert any(p.startswith("api.tls_cert_file, api.tls_key_file: set both") for p in problems), problems
    assert any(p.startswith("api.tls_cert_file:") and "not readable" in p for p in problems), problems


@pytest.mark.integration
def test_cli_config_check(clean_env, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[dicom]\nport = -1\n")
    r = subprocess.run(
        [PYTHON, "-m", "appliance", "--config", str(cfg), "config", "check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2
    assert "dicom.port" in r.stderr
    ok = subprocess.run(
        [PYTHON, "-m", "appliance", "--home", str(tmp_path), "config", "check", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert ok.returncode == 0, ok.stderr
    assert '"state_dir"' in ok.stdout


@pytest.mark.parametrize("var", ["APPLIANCE_ENGINES__PLUGINS", "APPLIANCE_PIPELINE"])
def test_malformed_json_in_an_environment_variable_is_a_config_error(
    clean_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, var: str
) -> None:
    monkeypatch.setenv(var, "{not json")
    with pytest.raises(ConfigError) as err:
        load_settings(None)
    assert "environment" in err.value.problems[0] and "JSON object" in err.value.problems[0]
