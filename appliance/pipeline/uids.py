"""Deterministic UIDs for result objects: same inputs + same bundle version -> same UIDs.

A re-run (restart, reprocessing) therefore re-creates identical SOP Instance UIDs and the PACS treats the
re-sent objects as the same instances instead of duplicating them. The UID is ``2.25.<int>`` (PS3.5 B.2,
a UUID-derived UID) with the integer taken from a SHA-256 of the sources, name-based like a UUIDv5.
(pydicom's ``generate_uid(prefix=None, entropy_srcs=...)`` ignores the entropy and is random.)
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable

NAMESPACE = "clinic-appliance/results/v1"


def derive_uid(*parts: str) -> str:
    digest = hashlib.sha256("\x1f".join([NAMESPACE, *parts]).encode("utf-8")).digest()
    value = uuid.UUID(bytes=digest[:16], version=5)  # sets the version/variant bits like a real UUIDv5
    return f"2.25.{value.int}"


def _key(source_uids: Iterable[str]) -> str:
    return ",".join(sorted(source_uids))


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


def sc_instance_uid(source_sop_uid: str, bundle_id: str, version: str) -> str:
    return derive_uid("sc", source_sop_uid, bundle_id, version)


def observer_uid(bundle_id: str, version: str) -> str:
    """The algorithm as an observer device in the SR (stable per bundle version)."""
    return derive_uid("device", bundle_id, version)


def tracking_uid(sop_uid: str, label: str, bundle_id: str, version: str) -> str:
    return derive_uid("tracking", sop_uid, label, bundle_id, version)
