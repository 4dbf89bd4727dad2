"""durable: the one way every package replaces a file so that a power cut leaves old or new."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from durable import fsync_dir, replace_durably, write_atomic


def test_write_atomic_replaces_with_mode_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "secret"
    write_atomic(target, b"first", mode=0o600)
    assert target.read_bytes() == b"first" and stat.S_IMODE(target.stat().st_mode) == 0o600
    write_atomic(target, b"second" * 100_000)
    assert target.read_bytes() == b"second" * 100_000 and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in target.parent.iterdir()) == ["secret"]


def test_failed_write_keeps_the_old_content(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    write_atomic(target, b"old")
    with pytest.raises(TypeError):
        write_atomic(target, None)  # type: ignore[arg-type]  # fails after the temp file exists
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_replace_durably_moves_directories_and_files(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "f").write_bytes(b"x")
    replace_durably(staging, tmp_path / "final")
    assert (tmp_path / "final" / "f").read_bytes() == b"x" and not staging.exists()
    with pytest.raises(NotADirectoryError):
        fsync_dir(tmp_path / "final" / "f")
    with pytest.raises(FileNotFoundError):
        replace_durably(tmp_path / "absent", tmp_path / "other")
    assert os.path.exists(tmp_path / "final")
