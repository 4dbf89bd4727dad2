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
from collections.abc import Mapping
from typing import Any

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


SIDE_WORDS = {"L": "Left", "R": "Right"}


def finding_text(reading: Mapping[str, Any], mammo: bool) -> str:
    """One finding as a radiologist reads it, from a ``reading`` entry (``{label, score, side, views, places}``,
    :func:`appliance.pipeline.postprocess.reading`): ``"L breast: mass 0.46 (CC, MLO)"`` for a mammogram (the
    views that support the breast's score), ``"Left: effusion 0.91"`` for a lateral finding elsewhere (``"(2
    places)"`` when marked at several), ``"nodule 0.12"`` without a side."""
    side = reading.get("side")
    text = f"{reading['label']} {float(reading.get('score') or 0.0):.2f}"
    if mammo and side in ("L", "R"):
        views = ", ".join(reading.get("views") or [])
        return f"{side} breast: {text}" + (f" ({views})" if views else "")
    places = int(reading.get("places") or 0)
    text += f" ({places} places)" if places > 1 else ""
    return f"{SIDE_WORDS[side]}: {text}" if side in SIDE_WORDS else text
