"""Display of DICOM Person Name and Date values for people (``appliance.worklist.display``)."""

from __future__ import annotations

import pytest

from appliance.worklist.display import dicom_date, person_name

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("pn", "shown"),
    [
        ("PHANTOM^JANE^Q", "PHANTOM, JANE Q"),
        ("DOE^JOHN", "DOE, JOHN"),
        ("DOE", "DOE"),
        ("^JOHN", "JOHN"),
        ("DOE^JOHN^^DR^JR", "DR DOE, JOHN, JR"),
        ("Yamada^Tarou=山田^太郎=やまだ^たろう", "Yamada, Tarou"),  # the alphabetic group first
        ("=山田^太郎", "山田, 太郎"),  # only an ideographic group
        ("^^^^", ""),
        ("", ""),
        (None, ""),
    ],
)
def test_person_name(pn: str | None, shown: str) -> None:
    assert person_name(pn) == shown


@pytest.mark.parametrize(
    ("da", "shown"),
    [
        ("20240102", "2024-01-02"),
        (" 20240102 ", "2024-01-02"),
        ("2024", "2024"),
        ("2024-01-02", "2024-01-02"),
        ("20240101-20240131", "20240101-20240131"),
        ("", ""),
        (None, ""),
    ],
)
def test_dicom_date(da: str | None, shown: str) -> None:
    assert dicom_date(da) == shown
