"""Can this box do its job? The problems a technician must hear about, shared by ``appliance status`` (which
lists them all) and ``appliance selftest`` (which fails on the ones that stop the box from doing its job).

Each check returns a :class:`Problem` or None; none of them raises. What "its job" means: results reach a
PACS (a destination is configured), and with cloud sync on, the box can authenticate to IoT Hub (its device
credentials are present and readable). Trusting the public demo key, or an API nobody can log in to, is a
problem to report but does not stop the box analysing and delivering.
"""

from __future__ import annotations

import base64
import binascii
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from appliance.cloud.client import credential_files, credential_problems
from appliance.core.config import Settings
from appliance.models import stats
from appliance.models.active import demo_key, registry


@dataclass(frozen=True)
class Problem:
    """One problem: ``key`` names the setting or part at fault (``pipeline.destinations``), ``message`` says it
    for people, ``blocking`` = the box cannot do its job (``selftest`` fails on it)."""

    key: str
    message: str
    blocking: bool

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


def no_destination(settings: Settings) -> Problem | None:
    """No PACS destination configured: results are made and stay on the box (studies stay ``inferred``)."""
    if settings.pipeline.destinations:
        return None
    return Problem(
        "pipeline.destinations",
        "no PACS destination configured: results stay on the box and nobody sees them",
        blocking=True,
    )


def _readable(path: Path) -> bytes | str:
    """The file's bytes, or why they cannot be read (a sentence)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return f"{path} is missing"
    except PermissionError:
        return f"{path} is not readable by this user"
    except OSError as exc:
        return f"{path} cannot be read: {exc.strerror or exc}"
    return data if data.strip() else f"{path} is empty"


def device_credentials(settings: Settings) -> Problem | None:
    """With ``cloud.enabled``: the SAS device key (base64) or the X.509 certificate and key (PEM) must be there
    and readable (``cloud.client.credential_files``), else the box can never connect."""
    c = settings.cloud
    if not c.enabled:
        return None
    key_file, cert_file, cert_key_file = credential_files(settings)
    if c.auth == "sas":
        data = _readable(key_file)
        if isinstance(data, str):
            return Problem("cloud.device_key_file", f"cloud enabled but no device key: {data}", blocking=True)
        try:
            if not base64.b64decode(data.strip(), validate=True):
                raise ValueError("empty")
        except (binascii.Error, ValueError):
            return Problem("cloud.device_key_file", f"{key_file} is not a base64 SAS key", blocking=True)
    else:
        for name, path in (("cloud.cert_file", cert_file), ("cloud.key_file", cert_key_file)):
            data = _readable(path)
            if isinstance(data, str):
                return Problem(name, f"cloud enabled (X.509) but {data}", blocking=True)
            if b"-----BEGIN" not in data:
                return Problem(name, f"{path} is not PEM", blocking=True)
    # readable here (perhaps only because this runs as root): can the service user read them too?
    unusable = credential_problems(settings)
    if unusable:
        key = "cloud.device_key_file" if c.auth == "sas" else "cloud.cert_file"
        return Problem(key, f"cloud enabled but the daemon cannot authenticate: {unusable[0]}", blocking=True)
    return None


def demo_key_trusted(settings: Settings) -> Problem | None:
    """The reference bundles' DEMO signing key (public, private half in the repository) is trusted: anyone can
    sign a bundle this box would run."""
    e = settings.engines
    kid, _ = demo_key()
    if e.trust_demo_key or (kid in e.trusted_keys and kid not in e.revoked_keys):
        return Problem(
            "engines.trust_demo_key",
            "the public DEMO key is trusted: anyone can sign a model this box would run (production: set it false)",
            blocking=False,
        )
    return None


def api_without_users(settings: Settings, conn: sqlite3.Connection | None) -> Problem | None:
    """``api.enabled`` with no enabled account: the dashboard listens and nobody can log in. ``conn`` is a
    (read-only) connection to ``state.db``, None when there is none yet."""
    if not settings.api.enabled:
        return None
    users = 0
    if conn is not None:
        try:
            users = int(conn.execute("SELECT COUNT(*) FROM users WHERE disabled=0").fetchone()[0])
        except sqlite3.Error:  # no accounts table in this database (yet)
            users = 0
    if users:
        return None
    return Problem(
        "api.enabled", "the dashboard is on but has no user: create the first admin with `appliance user add`", False
    )


def model_drift(settings: Settings, conn: sqlite3.Connection | None) -> Problem | None:
    """An active bundle version whose recent window drifted from its manifest's signed reference (the latest
    evaluation in ``bundle_drift``, ``appliance.models.stats``): the site's equipment, protocol or population may
    have changed, so the model may be wrong here. Not blocking: the box still does its job; someone must look."""
    if conn is None:
        return None
    active: list[tuple[str, str]] | None
    try:  # the installed active versions; none installed (a bare models directory): every evaluation counts
        active = [(b.bundle_id, b.version) for b in registry(settings).list() if b.active] or None
    except Exception:  # an unreadable models directory is other checks' business
        active = None
    try:
        lines = stats.drift_alerts(conn, active)
    except sqlite3.Error:  # no bundle_drift table in this database (yet)
        return None
    if not lines:
        return None
    return Problem(
        "models.drift",
        "inputs or scores drifted from the bundle's validation reference (equipment, protocol or population"
        " changed?): " + "; ".join(lines),
        blocking=False,
    )


def problems(settings: Settings, conn: sqlite3.Connection | None) -> list[Problem]:
    """Every problem above, blocking ones first."""
    found = [
        no_destination(settings),
        device_credentials(settings),
        demo_key_trusted(settings),
        api_without_users(settings, conn),
        model_drift(settings, conn),
    ]
    return sorted((p for p in found if p is not None), key=lambda p: not p.blocking)
