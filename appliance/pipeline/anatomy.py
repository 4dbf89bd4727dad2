"""What an image shows, read the way the standard requires it: the coded view, the coded anatomy, laterality.

The one place that reads these attributes; the router (which bundle takes an image) and postprocess (the view
and breast side reported per image) both use it.

- **View**: View Code Sequence (0054,0220), Type 1 in the MG IOD (PS3.3 C.8.11.7 Mammography Image Module) and
  Type 2 in DX (C.8.11.5 DX Positioning Module), codes from PS3.16 CID 4014 (View for Mammography) / CID 4010
  (DX View); its View Modifier Code Sequence (0054,0222) (CID 4015 / CID 4011), nested in the view's item or
  at the top level. View Position (0018,5101) (Type 3 in MG) is the fall-back.
- **Anatomy**: Anatomic Region Sequence (0008,2218) (C.8.11.2 DX Anatomy Imaged Module, CID 4009 / CID 4031;
  CID 4013 in MG), with Body Part Examined (0018,0015) (Type 3, C.7.3.1 General Series) as the fall-back; the
  two correspond as PS3.16 Annex L tabulates.
- **Laterality**: Image Laterality (0020,0062) (C.7.6.2 / C.8.11.2), the frame-level Frame Laterality
  (0020,9072) of the Frame Anatomy functional group (C.7.6.16.2.8, shared or per frame), the series
  Laterality (0020,0060) (C.7.3.1), then a left/right Anatomic Region Modifier (CID 244).

SNOMED concepts come with the SCT designator or the retired SRT one (PS3.16 Section 8); both name the same
concept. Comparison is pydicom's :class:`~pydicom.sr.coding.Code` equality, which maps SRT to SCT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

Side = Literal["L", "R", "B"]

_MG = codes.cid4014  # View for Mammography
_DX = codes.cid4010  # DX View
_REGION = codes.cid4031  # Common Anatomic Regions

# View Position terms (mammography: the ACR abbreviations MG devices write; DX: PS3.3 C.8.11.5.1.1 defined
# terms) and the View Code Sequence concepts each stands for. A retired SRT code with no SCT mapping in pydicom
# is listed as such (SRT R-10214 postero-anterior, still written by DX devices).
VIEW_TERMS: dict[str, tuple[Code, ...]] = {
    "CC": (_MG.CranioCaudal,),
    "MLO": (_MG.MedioLateralObliqueProjection,),
    "ML": (_MG.MedioLateralProjection,),
    "LM": (_MG.LateroMedial,),
    "LMO": (_MG.LateroMedialOblique,),
    "FB": (_MG.CaudoCranial,),
    "SIO": (_MG.SuperolateralToInferomedialOblique,),
    "ISO": (_MG.InferomedialToSuperolateralOblique,),
    "XCCL": (_MG.CranioCaudalExaggeratedLaterally,),
    "XCCM": (_MG.CranioCaudalExaggeratedMedially,),
    "AP": (_DX.AnteroPosterior,),
    "PA": (_DX.PosteroAnterior, Code("R-10214", "SRT", "postero-anterior")),
    "LL": (_DX.LeftLateral,),
    "RL": (_DX.RightLateral,),
    "LATERAL": (_DX.LateralProjection,),
}

# Body Part Examined defined terms and the Anatomic Region Sequence concepts each stands for (PS3.16 Annex L;
# the current CID 4031 code first, then codes of earlier editions that devices still write).
BODY_PART_TERMS: dict[str, tuple[Code, ...]] = {
    "CHEST": (_REGION.Chest, Code("51185008", "SCT", "Thorax")),
    "BREAST": (_REGION.Breast,),
    "ABDOMEN": (_REGION.Abdomen, Code("113345001", "SCT", "Abdomen")),
    "PELVIS": (_REGION.Pelvis, Code("12921003", "SCT", "Pelvis")),
    "HEAD": (_REGION.Head,),
    "SKULL": (_REGION.Skull,),
    "NECK": (_REGION.Neck,),
    "SPINE": (_REGION.Spine,),
    "CSPINE": (_REGION.CervicalSpine,),
    "TSPINE": (_REGION.ThoracicSpine,),
    "LSPINE": (_REGION.LumbarSpine,),
    "SHOULDER": (_REGION.Shoulder,),
    "ELBOW": (_REGION.ElbowJoint,),
    "HAND": (_REGION.Hand,),
    "HIP": (_REGION.Hip,),
    "KNEE": (_REGION.Knee,),
    "ANKLE": (_REGION.AnkleJoint,),
    "FOOT": (_REGION.Foot,),
}

_SIDES: dict[str, Side] = {"L": "L", "R": "R", "B": "B"}  # U (unpaired) and anything else: unknown
_SIDE_CODES: tuple[tuple[Code, Side], ...] = (
    (codes.cid244.Left, "L"),
    (codes.cid244.Right, "R"),
    (codes.cid244.Bilateral, "B"),
)


@dataclass(frozen=True)
class View:
    """An image's view: ``code`` from View Code Sequence, ``term`` its View Position term (from the code when
    the code is one of :data:`VIEW_TERMS`, else the image's View Position), ``modifiers`` the View Modifier
    Code Sequence concepts, ``source`` the attribute it was read from ("" when the image states no view)."""

    code: Code | None
    term: str | None
    modifiers: tuple[Code, ...]
    source: str

    @property
    def label(self) -> str | None:
        """What to show a person: the term, else the code's meaning."""
        return self.term or (self.code.meaning.strip() or None if self.code is not None else None)

    def describe(self) -> str:
        """The view and where it came from, for a routing reason (no PHI: codes and defined terms only)."""
        if self.code is not None:
            return f"{self.term or '?'} (View Code Sequence {code_text(self.code)})"
        if self.term:
            return f"{self.term} (View Position)"
        return "unknown (no View Code Sequence, no View Position)"


@dataclass(frozen=True)
class Region:
    """An image's anatomy: ``code`` from Anatomic Region Sequence, ``term`` its Body Part Examined term: the
    code's when it is one of :data:`BODY_PART_TERMS` (None for a code this build cannot name: the code
    overrides Body Part Examined), else the image's Body Part Examined."""

    code: Code | None
    term: str | None

    def describe(self) -> str:
        """The anatomy and where it came from, for a routing reason."""
        if self.code is not None:
            return f"{self.term or '?'} (Anatomic Region Sequence {code_text(self.code)})"
        if self.term:
            return f"{self.term} (Body Part Examined)"
        return "unknown (no Anatomic Region Sequence, no Body Part Examined)"


def code_text(code: Code) -> str:
    """``SCT 399162004 "cranio-caudal"``: a code for a reason or a log line (each part bounded in length)."""
    meaning = code.meaning.strip()[:64]
    text = f"{code.scheme_designator[:16]} {code.value.strip()[:64]}"
    return text + (f' "{meaning}"' if meaning else "")


def code_of(item: Any) -> Code | None:
    """The concept of one Code Sequence item (PS3.3 Table 8.8-1: Code Value, else Long Code Value or URN Code
    Value; Coding Scheme Designator), or None when the item states none (or is not a sequence item at all: a
    hostile or broken file may put text where a sequence belongs)."""
    if not isinstance(item, Dataset):
        return None
    value = ""
    for keyword in ("CodeValue", "LongCodeValue", "URNCodeValue"):
        raw = item.get(keyword, "") or ""
        value = str(raw[0] if isinstance(raw, MultiValue) and len(raw) else raw).strip()
        if value:
            break
    scheme = str(item.get("CodingSchemeDesignator", "") or "").strip().upper()
    if not value or (not scheme and "URNCodeValue" not in item):
        return None
    return Code(value, scheme, str(item.get("CodeMeaning", "") or ""))


def _first_code(ds: Any, keyword: str) -> tuple[Code | None, Any]:
    """The first item of a Code Sequence that carries a concept, and the item itself (a value that is not a
    sequence counts as absent)."""
    for item in _items(ds.get(keyword, None)):
        code = code_of(item)
        if code is not None:
            return code, item
    return None, None


def _items(value: Any) -> list[Any]:
    """The items of a sequence value; [] for anything else (absent, text, a number)."""
    return list(value) if isinstance(value, (Sequence, list, tuple)) else []


def _datasets(value: Any) -> list[Dataset]:
    """The items of a sequence value that are data sets."""
    return [item for item in _items(value) if isinstance(item, Dataset)]


def _codes(items: Any) -> list[Code]:
    return [c for c in (code_of(i) for i in _items(items)) if c is not None]


def defined_term(value: Any) -> str:
    """A Code String attribute's value as a defined term: the first value of a multi-valued element, stripped
    of padding, upper case; "" when absent or empty. The one reader of CS terms (modality, body part, view
    position, laterality, VOI LUT function, presentation LUT shape) in the pipeline."""
    if isinstance(value, (MultiValue, list, tuple)):
        value = value[0] if len(value) else ""
    return str(value or "").strip().upper()


def _term(ds: Any, keyword: str) -> str | None:
    return defined_term(ds.get(keyword, "")) or None


def term_of(code: Code, table: dict[str, tuple[Code, ...]]) -> str | None:
    """The defined term (of :data:`VIEW_TERMS` or :data:`BODY_PART_TERMS`) a concept stands for, if any."""
    return next((term for term, known in table.items() if any(code == k for k in known)), None)


def view_of(ds: Any) -> View:
    """The image's view as PS3.3 C.8.11.7 / C.8.11.5 state it: View Code Sequence first, View Position as the
    fall-back; with the View Modifier Code Sequence concepts (nested in the view's item, or top level)."""
    code, item = _first_code(ds, "ViewCodeSequence")
    modifiers = _codes(item.get("ViewModifierCodeSequence", None)) if item is not None else []
    modifiers += [m for m in _codes(ds.get("ViewModifierCodeSequence", None)) if m not in modifiers]
    position = _term(ds, "ViewPosition")
    if code is not None:
        # the code overrides View Position: a view this build does not know by name (an oblique, a specimen)
        # has no name, so no bundle stating views by name takes it, rather than it passing for the old position
        return View(code, term_of(code, VIEW_TERMS), tuple(modifiers), "View Code Sequence")
    return View(None, position, tuple(modifiers), "View Position" if position else "")


def region_of(ds: Any) -> Region:
    """The image's anatomy: Anatomic Region Sequence (PS3.3 C.8.11.2) first, Body Part Examined the fall-back."""
    code, _ = _first_code(ds, "AnatomicRegionSequence")
    body_part = _term(ds, "BodyPartExamined")
    if code is not None:  # the code overrides Body Part Examined, as the view's does View Position
        return Region(code, term_of(code, BODY_PART_TERMS))
    return Region(None, body_part)


def _frame_side(ds: Any) -> Side | None:
    """Frame Laterality (0020,9072) of the Frame Anatomy Sequence (PS3.3 C.7.6.16.2.8): the shared functional
    group's, else the per-frame groups' when every frame states the same side."""
    for group in _datasets(ds.get("SharedFunctionalGroupsSequence", None)):
        for anatomy in _datasets(group.get("FrameAnatomySequence", None)):
            side = _SIDES.get(defined_term(anatomy.get("FrameLaterality", "")))
            if side:
                return side
    sides = set()
    for group in _datasets(ds.get("PerFrameFunctionalGroupsSequence", None)):
        frame = _datasets(group.get("FrameAnatomySequence", None))
        sides.add(_SIDES.get(defined_term(frame[0].get("FrameLaterality", ""))) if frame else None)
    return sides.pop() if len(sides) == 1 else None


def laterality_of(ds: Any) -> Side | None:
    """Which side the image shows ("L", "R", "B" both) or None when unknown ("U" unpaired included): Image
    Laterality (0020,0062), else the frame-level Frame Laterality (0020,9072), else the series Laterality
    (0020,0060), else a left/right/bilateral Anatomic Region Modifier (PS3.16 CID 244)."""
    side = _SIDES.get(defined_term(ds.get("ImageLaterality", ""))) or _frame_side(ds)
    side = side or _SIDES.get(defined_term(ds.get("Laterality", "")))
    if side:
        return side
    _, region = _first_code(ds, "AnatomicRegionSequence")
    for modifier in _codes(region.get("AnatomicRegionModifierSequence", None)) if region is not None else ():
        for known, s in _SIDE_CODES:
            if modifier == known:
                return s
    return None
