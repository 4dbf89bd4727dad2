"""The contract between the central team's update tooling and the box's update agent.

Both sides import these names; nothing else spells a blob prefix, a TUF target path or a twin property of the
update protocol.

Repository (TUF 1.0 specification, https://theupdateframework.github.io/specification/latest/): static files
in one Azure Blob Storage container (or a local folder with the same layout)::

    metadata/1.root.json, metadata/2.root.json, ...   every root version (the box walks the chain)
    metadata/timestamp.json                           unversioned, as TUF requires
    metadata/<N>.snapshot.json, metadata/<N>.targets.json   consistent snapshots
    targets/<bundle_id>/<sha256>.<bundle_id>-<version>.bundle   consistent-snapshot target files (TUF 5.7.3)

Director (Uptane's per-device director, carried by the device twin; see docs/UPDATES.md)::

    desired.model_updates = {
        "bundles": {"<bundle_id>": {"version": "<semver>"}, ...},
        "policy": {"window": "HH:MM-HH:MM" | null,      # local time on the box; null = any time
                   "health_studies": int,               # real studies without engine errors to pass the gate
                   "health_deadline_s": float}          # gate fails (rollback) if not passed by then
    }
    reported.model_updates = {"<bundle_id>": {"state": <UpdateState>, "version": target version,
        "active_version": str | null, "bytes": int, "total": int | null, "reason": str | null,
        "since": ISO 8601 UTC}}
"""

from __future__ import annotations

from enum import StrEnum

METADATA_PREFIX = "metadata/"
TARGETS_PREFIX = "targets/"
DEFAULT_CONTAINER = "model-updates"
DESIRED_KEY = "model_updates"
REPORTED_KEY = "model_updates"


def target_path(bundle_id: str, version: str) -> str:
    """The TUF target path of one bundle version, e.g. ``cxr-phantom/cxr-phantom-1.1.0.bundle``.

    ``bundle_id`` and ``version`` must already be validated (manifest rules); this only joins them.
    """
    return f"{bundle_id}/{bundle_id}-{version}.bundle"


class UpdateState(StrEnum):
    """The update state machine reported per bundle (after Azure Device Update's and Mender's)."""

    IDLE = "idle"
    WAITING_WINDOW = "waiting_window"  # a target is known; outside the maintenance window
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    COMPILING = "compiling"
    VALIDATING = "validating"  # golden check of the compiled engine on this hardware
    ACTIVATING = "activating"
    HEALTH_GATE = "health_gate"  # active, on probation: self-check + first real studies
    ACTIVE = "active"
    FAILED = "failed"  # the new version never served; the old one keeps serving
    ROLLED_BACK = "rolled_back"  # the new version served and failed its health gate
