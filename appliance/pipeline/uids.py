"""Deterministic UIDs for result objects: same inputs + same bundle version -> same UIDs.

A re-run (restart, reprocessing) therefore re-creates identical SOP Instance UIDs and the PACS treats the
re-sent objects as the same instances instead of duplicating them. The UID is ``2.25.<int>`` (PS3.5 B.2,
a UUID-derived UID) with the integer taken from a SHA-256 of the sources, name-based like a UUIDv5.
(pydicom's ``generate_uid(prefix=None, entropy_srcs=...)`` ignores the entropy and is random.)

Per-image UIDs (the SC, the SR's tracking identifiers) derive from the image's identity, its (Study, Series,
SOP Instance UID) triple (:func:`image_key`), not from the SOP Instance UID alone: modalities do re-use a
SOP Instance UID for another image in another series (a re-take), and the two results must stay two
objects (PS3.3 C.12.1.1.1: a SOP Instance UID identifies one instance). A corrected resend in the same
series keeps the same identity, hence the same UIDs (its result replaces the earlier one).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from typing import Any

NAMESPACE = "clinic-appliance/results/v1"


def derive_uid(*parts: str) -> str:
    """``2.25.<int>`` (PS3.5 B.2) from a SHA-256 of ``parts``: the same parts always give the same UID."""
    digest = hashlib.sha256("\x1f".join([NAMESPACE, *parts]).encode("utf-8")).digest()
    value = uuid.UUID(bytes=digest[:16], version=5)  # sets the version/variant bits like a real UUIDv5
    return f"2.25.{value.int}"


def _key(source_uids: Iterable[str]) -> str:
    return ",".join(sorted(source_uids))


def image_key(study_uid: str, series_uid: str | None, sop_uid: str) -> str:
    """The identity of one source image for derived UIDs: Study, Series and SOP Instance UID (PS3.3 C.7.2.1,
    C.7.3.1, C.12.1). A missing Series Instance UID counts as the empty string."""
    return "\x1e".join((study_uid, series_uid or "", sop_uid))


def sr_series_uid(study_uid: str, bundle_id: str, version: str) -> str:
    return derive_uid("sr-series", study_uid, bundle_id, version)


def sr_instance_uid(study_uid: str, source_uids: Iterable[str], bundle_id: str, version: str) -> str:
    return derive_uid("sr", study_uid, _key(source_uids), bundle_id, version)


def sc_series_uid(study_uid: str, bundle_id: str, version: str, laterality: str | None = None) -> str:
    """The SC series of a study and bundle version, one per laterality ("L", "R"; ``None``: unpaired images,
    the same UID as before series were split by side)."""
    if laterality is None:
        return derive_uid("sc-series", study_uid, bundle_id, version)
    return derive_uid("sc-series", study_uid, bundle_id, version, laterality)


def sc_instance_uid(study_uid: str, series_uid: str | None, source_sop_uid: str, bundle_id: str, version: str) -> str:
    """The SOP Instance UID of the Secondary Capture (PS3.3 A.8) of one source image: one per image identity
    (:func:`image_key`) and bundle version, so two images sharing a SOP Instance UID in two series get two."""
    return derive_uid("sc-image", image_key(study_uid, series_uid, source_sop_uid), bundle_id, version)


def observer_uid(bundle_id: str, version: str) -> str:
    """The algorithm as an observer device in the SR (stable per bundle version)."""
    return derive_uid("device", bundle_id, version)


def tracking_uid(study_uid: str, series_uid: str | None, sop_uid: str, label: str, bundle_id: str, version: str) -> str:
    """Tracking Unique Identifier (PS3.16 TID 4108) of one finding on one source image (:func:`image_key`)."""
    return derive_uid("tracking-image", image_key(study_uid, series_uid, sop_uid), label, bundle_id, version)


def shared_sop_uids(images: Iterable[tuple[str | None, str]]) -> list[dict[str, Any]]:
    """The SOP Instance UIDs that more than one image of a study carries, from (Series Instance UID, SOP
    Instance UID) pairs: ``[{"sop_instance_uid", "series_uids"}]``, sorted. Against PS3.3 C.12.1.1.1 (a SOP
    Instance UID identifies one instance) but sent by modalities that re-use UIDs; both images are analysed
    and the result notes the conflict. Copies of one image (same series and SOP UID) are not a conflict."""
    series: dict[str, set[str]] = {}
    for series_uid, sop_uid in images:
        series.setdefault(sop_uid, set()).add(series_uid or "")
    return [{"sop_instance_uid": sop, "series_uids": sorted(s)} for sop, s in sorted(series.items()) if len(s) > 1]


def notice_series_uid(study_uid: str, bundle_id: str, version: str) -> str:
    """The series of the "AI not applied" notices of a study and bundle version (``results_notice``)."""
    return derive_uid("notice-series", study_uid, bundle_id, version)


def notice_instance_uid(study_uid: str, image_keys: Iterable[str], bundle_id: str, version: str) -> str:
    """The SOP Instance UID of the "AI not applied" notice of a study and bundle version, from the identities
    (:func:`image_key`) of the images the gate refused: the same refusal gives the same UID on a re-run."""
    return derive_uid("notice", study_uid, _key(image_keys), bundle_id, version)
