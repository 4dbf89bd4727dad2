"""Shared fixtures. Tests start what they need on 127.0.0.1 with ephemeral ports and stop it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A fresh state directory."""
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No APPLIANCE_* variables leak in from the developer's shell."""
    for k in list(os.environ):
        if k.startswith("APPLIANCE_"):
            monkeypatch.delenv(k)
