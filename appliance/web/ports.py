"""What the web layer needs of the rest of the daemon that only the composition root can give it.

``appliance/app/compose.py`` fills :class:`WebPorts` with callables over the running services (the web never
imports ``appliance.app``); tests fill it with their own. Each callable is cheap unless its doc says otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from appliance.worklist.feedback import FeedbackPublisher


def no_cloud() -> dict[str, Any] | None:
    """``cloud`` when cloud sync is off."""
    return None


def no_engines() -> dict[str, Any]:
    """``engines`` when the pipeline is off."""
    return {"bundles_active": [], "backend": "none"}


def no_operating_points() -> dict[str, Any]:
    """``operating_points`` on a box without cloud sync: none (the manifests' thresholds judge)."""
    return {}


def no_problems() -> list[dict[str, Any]]:
    """``problems`` where nothing checks them (tests of the web alone)."""
    return []


def no_models() -> list[dict[str, Any]]:
    """``models`` for a box with no model registry."""
    return []


@dataclass
class WebPorts:
    """The daemon as the dashboard sees it.

    - ``selftest()``: run the technician's self-test (slow: tens of seconds); the report
      ``{"ok": bool, "at": iso, "checks": [{"name", "ok", "detail", "seconds"}]}``.
    - ``echo(destination_name)``: C-ECHO that PACS destination with the exporter's settings; ``(ok, detail)``.
      Raises KeyError for an unknown destination name.
    - ``status_doc()``: each service's status, as in ``run/status.json`` (``{service name: {...}}``).
    - ``listener_up()``: True while the DICOM SCP accepts associations.
    - ``engines()``: the loaded bundles, ``{"bundles_active": [{"bundle_id", "version", "backend",
      "precision"}], "backend": str}``.
    - ``models()``: every installed bundle version with its state (active, previous, failure), newest last.
    - ``cloud()``: the cloud agent's status (``connected``, ``outbox``, ...) or None when cloud sync is off.
    - ``log_hint``: where the daemon's log lines go (shown on the technician page when no log file is kept).
    - ``operating_points()``: the site operating points in force, bundle id -> ``{"version", "site",
      "thresholds": {label: threshold}}`` (empty: every bundle's manifest thresholds).
    - ``problems()``: the PROBLEMS ``appliance status`` lists (``appliance.app.readiness.problems``, blocking
      first), each ``{"key": str, "message": str, "blocking": bool}``; reads the database (milliseconds).
    - ``feedback_publisher``: where radiologists' feedback goes besides this box (the cloud outbox), or None.
    """

    selftest: Callable[[], dict[str, Any]]
    echo: Callable[[str], tuple[bool, str]]
    status_doc: Callable[[], dict[str, Any]]
    listener_up: Callable[[], bool]
    engines: Callable[[], dict[str, Any]] = no_engines
    models: Callable[[], list[dict[str, Any]]] = no_models
    cloud: Callable[[], dict[str, Any] | None] = no_cloud
    log_hint: str = "stdout (journald: journalctl -u appliance)"
    pipeline_enabled: bool = True
    operating_points: Callable[[], dict[str, Any]] = no_operating_points
    feedback_publisher: FeedbackPublisher | None = None
    problems: Callable[[], list[dict[str, Any]]] = no_problems


def with_update_states(rows: list[dict[str, Any]], updates: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Installed-version rows (``bundle_id``, ``version``, ``state``, ...) with each bundle's over-the-air update
    (``updates``: bundle id -> the reported document, ``appliance.updates.layout``) as an ``update`` text, e.g.
    ``"downloading 1.1.0"`` or ``"rolled_back 1.1.0: <reason>"``: on the row of the update's target version, else
    on the active row; a bundle with an update and no installed version gets a row of its own. Returns ``rows``
    (changed in place) plus those rows."""
    for r in rows:
        r.setdefault("update", None)
    for bundle_id, doc in updates.items():
        text = f"{doc.get('state')} {doc.get('version') or ''}".strip()
        if doc.get("reason"):
            text += f": {doc['reason']}"
        mine = [r for r in rows if r["bundle_id"] == bundle_id]
        targets = [r for r in mine if r["version"] == doc.get("version")] or [r for r in mine if r["state"] == "active"]
        if targets:
            targets[0]["update"] = text
        else:
            rows.append(
                {
                    "bundle_id": bundle_id,
                    "version": doc.get("version"),
                    "state": "not installed",
                    "installed_at": None,
                    "key_id": None,
                    "failure": None,
                    "update": text,
                }
            )
    return rows
