"""``appliance studies`` and ``appliance study show`` as people read them: a DICOM Person Name as "FAMILY, GIVEN",
a DICOM date as YYYY-MM-DD, and values from the modality printed as they came, never read as rich markup
(a "[/]" in a name stopped the listing; a "[x]" vanished)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from appliance.cli import app
from appliance.core.config import Settings
from appliance.core.store import Store
from tests.test_worklist import analysed_study, chest

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("columns", [80, 200])
def test_names_dates_and_bracketed_values_are_shown_as_people_read_them(home: Path, clean_env, columns: int) -> None:
    settings = Settings(state_dir=home)
    store = Store(settings.db_path)
    plain = chest()
    plain.PatientName = "DOE^JOHN"
    plain.PatientID = "P1"
    odd = chest()
    odd.PatientName = "ROE [/]^ANN"
    odd.PatientID = "P2"
    odd.AccessionNumber = "A[red]9"
    analysed_study(settings, store, [plain])
    analysed_study(settings, store, [odd])
    store.close()
    runner = CliRunner()
    env = {"COLUMNS": str(columns)}

    listed = runner.invoke(app, ["--home", str(home), "studies"], env=env)
    assert listed.exit_code == 0, listed.output
    assert "P1 DOE, JOHN" in listed.output and "P2 ROE [/], ANN" in listed.output
    assert "A[red]9" in listed.output

    # --wide: every column whole at any terminal width (long lines, never a column dropped or a UID cut)
    wide = runner.invoke(app, ["--home", str(home), "studies", "--wide"], env=env)
    uid = odd.StudyInstanceUID
    (line,) = [x for x in wide.output.splitlines() if uid in x]
    assert line.split()[0] == "2" and "P2 ROE [/], ANN" in line and "A[red]9" in line and "nodule" in line

    shown = runner.invoke(app, ["--home", str(home), "study", "show", "2"], env=env)
    assert shown.exit_code == 0, shown.output
    assert "ROE [/], ANN / P2" in shown.output and "A[red]9" in shown.output
    assert "study date          2024-01-01" in shown.output  # DICOM DA 20240101
    one = runner.invoke(app, ["--home", str(home), "study", "show", "1", "--json"], env=env)
    assert '"patient_name": "DOE^JOHN"' in one.output  # the JSON keeps the DICOM value
