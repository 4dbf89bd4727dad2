"""Deterministic UIDs for result objects: same inputs + same bundle version -> same UIDs.

A re-run (restart, reprocessing) therefore re-creates identical SOP Instance UIDs and the PACS treats the
re-sent objects as the same instances instead of duplicating them. pydicom's ``generate_uid`` with
``entropy_srcs`` hashes the sources into a ``2.25.<int>`` UID.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.uid import generate_uid

NAMESPACE = "clinic-appliance/results/v1"


def derive_uid(*parts: str) -> str:
    return str(generate_uid(prefix=None, entropy_srcs=[NAMESPACE, *parts]))


def _key(source_uids: Iterable[str]) -> str:
    return ",".join(sorted(source_uids))


def sr_series_uid(study_uid: str, bundle_id: str, version: str) -> str:
    return derive_uid("sr-series", study_uid, bundle_id, version)


def sr_instance_uid(study_uid: str, source_uids: Iterable[str], bundle_id: str, version: str) -> str:
    return derive_uid("sr", study_uid, _key(source_uids), bundle_id, version)


def sc_series_uid(study_uid: str, bundle_id: str, version: str) -> str:
    return derive_uid("sc-series", study_uid, bundle_id, version)


def sc_instance_uid(source_sop_uid: str, bundle_id: str, version: str) -> str:
    return derive_uid("sc", source_sop_uid, bundle_id, version)


def observer_uid(bundle_id: str, version: str) -> str:
    """The algorithm as an observer device in the SR (stable per bundle version)."""
    return derive_uid("device", bundle_id, version)


def tracking_uid(sop_uid: str, label: str, bundle_id: str, version: str) -> str:
    return derive_uid("tracking", sop_uid, label, bundle_id, version)
