"""In-process parts of the update agent: the study gate, the persisted update rows, the anti-rollback floor."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from appliance.core.store import Store
from appliance.updates.gate import StudyGate, SwitchTimeout
from appliance.updates.layout import UpdateState
from appliance.updates.state import Superseded, UpdateStore

pytestmark = pytest.mark.unit


def test_switch_waits_for_the_running_study_and_keeps_new_ones_out() -> None:
    gate = StudyGate()
    events: list[str] = []
    in_study, release = threading.Event(), threading.Event()

    def study(name: str, hold: threading.Event | None = None) -> None:
        with gate.study():
            events.append(f"{name} start")
            if hold is not None:
                in_study.set()
                hold.wait(10)
            events.append(f"{name} end")

    def switch() -> None:
        with gate.switch(timeout_s=10):
            events.append("switch")

    first = threading.Thread(target=study, args=("s1", release))
    first.start()
    in_study.wait(10)
    sw = threading.Thread(target=switch)
    sw.start()
    while gate.status()["waiting"] == 0:  # the switch is queued behind s1
        time.sleep(0.01)
    second = threading.Thread(target=study, args=("s2",))
    second.start()
    time.sleep(0.1)
    assert events == ["s1 start"]  # neither the switch nor a new study while s1 runs
    release.set()
    for t in (first, sw, second):
        t.join(10)
    assert events == ["s1 start", "s1 end", "switch", "s2 start", "s2 end"]  # the waiting switch went first


def test_switch_gives_up_after_its_timeout_and_studies_go_on() -> None:
    gate = StudyGate()
    with gate.study(), pytest.raises(SwitchTimeout), gate.switch(timeout_s=0.05):
        pass
    with gate.study():  # not blocked by the abandoned switch
        assert gate.status() == {"studies": 1, "switching": False, "waiting": 0}


def test_rows_move_only_while_they_target_the_same_version(tmp_path: Path) -> None:
    rows = UpdateStore(Store(tmp_path / "state.db"))
    row = rows.target("tiny", "1.1.0", {"health_studies": 1}, UpdateState.WAITING_WINDOW)
    row = rows.move(row, UpdateState.DOWNLOADING, total=100)
    assert (row.state, row.total, row.bytes) == (UpdateState.DOWNLOADING, 100, 0)
    rows.target("tiny", "1.2.0", {}, UpdateState.WAITING_WINDOW)  # the director moved on
    with pytest.raises(Superseded):
        rows.move(row, UpdateState.VERIFYING)
    assert rows.get("tiny").target == "1.2.0"  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        rows.move(rows.get("tiny"), UpdateState.VERIFYING, version="x")  # type: ignore[arg-type]


def test_health_count_only_on_probation(tmp_path: Path) -> None:
    rows = UpdateStore(Store(tmp_path / "state.db"))
    row = rows.target("tiny", "1.1.0", {}, UpdateState.ACTIVATING)
    assert rows.count_healthy("tiny", "1.1.0") == 0  # not on probation yet: not counted
    rows.move(row, UpdateState.HEALTH_GATE)
    assert rows.count_healthy("tiny", "1.1.0") == 1
    assert rows.count_healthy("tiny", "1.0.0") == 0  # another version's studies do not count
    assert rows.count_healthy("tiny", "1.1.0") == 2


def test_highest_version_ever_installed_never_goes_down(tmp_path: Path) -> None:
    rows = UpdateStore(Store(tmp_path / "state.db"))
    assert rows.highest("tiny") is None
    assert rows.record_installed("tiny", "1.2.0") == "1.2.0"
    assert rows.record_installed("tiny", "1.10.0") == "1.10.0"  # semantic order, not text order
    assert rows.record_installed("tiny", "1.9.9") == "1.10.0"
    assert rows.record_installed("tiny", "1.10.0-rc.1") == "1.10.0"  # a pre-release sorts before its release
    assert rows.highest("tiny") == "1.10.0"
