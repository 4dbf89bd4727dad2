"""The technician's self-test: is this box able to do its job right now?

Checks, each with a clear pass/fail and detail: the configuration, a PACS destination to deliver to, the cloud
device credentials when cloud sync is on (``appliance.app.readiness``), free disk, the state database, every
active bundle's golden check on this hardware, the whole analysis chain on phantoms of known truth (the
shipped reference bundles, loaded in a throw-away sandbox so they are never activated and whatever keys
the box trusts do not matter), and a C-ECHO to each PACS destination. Used by ``appliance selftest``
and the ``run_selftest`` direct method.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from appliance.app import readiness
from appliance.core.config import Settings, check_problems
from appliance.core.logs import get_logger
from appliance.core.store import Store
from appliance.models import active as models

log = get_logger(__name__)

LOCATION_TOLERANCE = 0.02  # of the image size, as the pipeline's acceptance


def _config(settings: Settings) -> tuple[bool, str]:
    problems = check_problems(settings)
    return not problems, "; ".join(problems) or "no problems"


def _destination(settings: Settings) -> tuple[bool, str]:
    problem = readiness.no_destination(settings)
    if problem is not None:
        return False, str(problem)
    return True, ", ".join(f"{d.name} ({d.ae_title}@{d.host}:{d.port})" for d in settings.pipeline.destinations)


def _cloud_credentials(settings: Settings) -> tuple[bool, str]:
    if not settings.cloud.enabled:
        return True, "cloud sync off"
    problem = readiness.device_credentials(settings)
    if problem is not None:
        return False, str(problem)
    return True, f"{settings.cloud.auth} credentials readable for device {settings.cloud.device_id!r}"


def _disk(settings: Settings) -> tuple[bool, str]:
    path = settings.state_dir if settings.state_dir.exists() else settings.state_dir.parent
    free = shutil.disk_usage(path).free
    floor = settings.dicom.min_free_bytes
    return free >= floor, f"{free / 1e9:.1f} GB free, floor {floor / 1e9:.1f} GB"


def _database(settings: Settings) -> tuple[bool, str]:
    store = Store(settings.db_path)
    try:
        ok = store.query("PRAGMA quick_check")[0][0]
        return ok == "ok", f"schema {store.schema_version()}, quick_check {ok}"
    finally:
        store.close()


def _active_bundles(settings: Settings) -> tuple[bool, str]:
    engines = models.ActiveEngines(settings, install_reference=settings.engines.install_reference_bundles)
    try:
        engines.active()  # verify, compile or load from cache, golden-check
        described = engines.describe()["bundles_active"]
        if not described:
            return False, "no active bundle loaded (every study would be 'no_model')"
        return True, ", ".join(f"{b['bundle_id']}@{b['version']} on {b['backend']}" for b in described)
    finally:
        engines.close()


def _phantom_chain(settings: Settings) -> tuple[bool, str]:
    from appliance.app.infer_offline import run_offline
    from engines.reference.phantoms import chest_study, mammo_study

    with tempfile.TemporaryDirectory(prefix="appliance-selftest-") as tmp:
        root = Path(tmp)
        sandbox = settings.model_copy(deep=True)
        sandbox.state_dir = root / "home"
        # a throw-away home that holds nothing but the reference bundles: the demo key is trusted there only,
        # and none of the box's own keys
        sandbox.engines.trusted_keys = {}
        sandbox.engines.trust_demo_key = True
        sandbox.engines.install_reference_bundles = True
        chest = chest_study(root / "in", seed=11, nodules=1)
        mammo_study(root / "in", seed=12, masses={"R": 1})
        report = run_offline(sandbox, [root / "in"], out=None)
        findings = {
            f["image_sop_uid"] + "/" + f["label"]: f
            for s in report["studies"]
            for r in s["results"]
            for f in r["findings"]
        }
        problems = []
        truth = chest["truth"][0]
        (nodule,) = [f for f in truth["findings"] if f["kind"] == "nodule"]
        got = findings.get(truth["sop_instance_uid"] + "/nodule")
        if not got or not got["positive"] or not got["location"]:
            problems.append("chest phantom: nodule not found")
        else:
            x, y = nodule["center_xy"]
            loc = got["location"]
            err = max(abs(loc["col"] - x) / truth["columns"], abs(loc["row"] - y) / truth["rows"])
            if err > LOCATION_TOLERANCE:
                problems.append(f"chest phantom: nodule {err:.1%} of the image size from the truth")
        breasts = next((r["per_breast"] for s in report["studies"] for r in s["results"] if r["per_breast"]), None)
        if not breasts or not breasts.get("R", 0) > breasts.get("L", 1):
            problems.append(f"mammogram phantom: mass in R, per-breast scores {breasts}")
        if problems or not breasts:
            return False, "; ".join(problems)
        mammo = f"mammogram with a mass in R: R {breasts['R']:.2f} > L {breasts['L']:.2f}"
        return True, f"chest nodule located within {err:.2%}; {mammo}"


def engine_selftest(settings: Settings) -> tuple[bool, str]:
    """The engine part of the self-test (every active bundle's golden check on this hardware, then the
    phantom chain), as the update agent's health gate runs it: (passed, detail). Never raises."""
    details = []
    for name, fn in (("active_bundles", _active_bundles), ("phantom_chain", _phantom_chain)):
        try:
            ok, detail = fn(settings)
        except Exception as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        details.append(f"{name}: {detail}")
        if not ok:
            return False, "; ".join(details)
    return True, "; ".join(details)


def _pacs(settings: Settings, dest: Any) -> Callable[[], tuple[bool, str]]:
    def check() -> tuple[bool, str]:
        from appliance.delivery.export import echo

        return echo(settings, dest)

    return check


def run_selftest(settings: Settings, *, pacs: bool = True) -> dict[str, Any]:
    """Every check, never raising: a check that crashes is a failed check with the error as its detail."""
    checks: list[tuple[str, Callable[[], tuple[bool, str]]]] = [
        ("config", lambda: _config(settings)),
        ("pacs_destination", lambda: _destination(settings)),
        ("cloud_credentials", lambda: _cloud_credentials(settings)),
        ("disk", lambda: _disk(settings)),
        ("database", lambda: _database(settings)),
        ("active_bundles", lambda: _active_bundles(settings)),
        ("phantom_chain", lambda: _phantom_chain(settings)),
    ]
    if pacs:
        checks += [(f"pacs:{d.name}", _pacs(settings, d)) for d in settings.pipeline.destinations]
    results = []
    for name, fn in checks:
        t0 = time.perf_counter()
        try:
            ok, detail = fn()
        except Exception as exc:  # a self-test reports, it does not crash
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        results.append({"name": name, "ok": bool(ok), "detail": detail, "seconds": round(time.perf_counter() - t0, 3)})
        log.info("self-test check", check=name, ok=ok, detail=detail)
    report = {
        "ok": all(r["ok"] for r in results),
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "checks": results,
    }
    log.info("self-test finished", ok=report["ok"], failed=[r["name"] for r in results if not r["ok"]])
    return report
