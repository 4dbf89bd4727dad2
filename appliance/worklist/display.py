"""How people read DICOM values on the dashboard and in the CLI (the read model keeps them as DICOM has them).

- Person Name (PN, PS3.5 6.2): ``FAMILY^GIVEN^MIDDLE^PREFIX^SUFFIX``, optionally ``=``-separated ideographic and
  phonetic groups, shown as ``FAMILY, GIVEN MIDDLE`` (prefix and suffix around it) from the first group that
  is not empty.
- Date (DA, PS3.5 6.2): ``YYYYMMDD`` shown as ISO 8601 ``YYYY-MM-DD``.

A value that does not follow its VR is shown as it came, never hidden or refused: the box shows what the
modality sent.
"""

from __future__ import annotations

import re

_DA = re.compile(r"^(\d{4})(\d{2})(\d{2})$")


def person_name(pn: str | None) -> str:
    """``"PHANTOM^JANE^Q"`` -> ``"PHANTOM, JANE Q"``; ``"DR^^^^"``-style empties dropped; ``None``/empty -> ``""``."""
    if not pn:
        return ""
    first_group = next((g for g in pn.split("=") if g.strip("^ ")), "")  # alphabetic, else ideographic, ...
    if "^" not in first_group:
        return first_group.strip()
    parts = [p.strip() for p in first_group.split("^")] + [""] * 5
    family, given, middle, prefix, suffix = parts[:5]
    rest = " ".join(x for x in (given, middle) if x)
    name = f"{family}, {rest}" if family and rest else family or rest
    name = " ".join(x for x in (prefix, name) if x)
    return f"{name}, {suffix}" if suffix and name else name or suffix


def dicom_date(da: str | None) -> str:
    """``"20240102"`` -> ``"2024-01-02"``; anything else (a range, a malformed value) unchanged; ``None`` -> ``""``."""
    if not da:
        return ""
    m = _DA.match(da.strip())
    return f"{m[1]}-{m[2]}-{m[3]}" if m else da
