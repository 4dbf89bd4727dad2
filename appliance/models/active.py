"""The appliance's side of the engines: trust and options from config, reference bundles, active engines.

Why here: ``engines`` knows nothing of the appliance's config. This module turns ``EnginesConfig`` into the
engines' trust store and options, installs the shipped reference bundles on first run, and gives the
pipeline its bundle source, :class:`ActiveEngines` (every active bundle with a loaded engine, reloaded
when the active version changes); :func:`load_active_engines` is the one-shot form for tools.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from appliance import __version__
from appliance.core.config import Settings
from appliance.core.logs import get_logger
from engines import runtime
from engines.backends.base import Engine
from engines.bundle import read_manifest_unverified
from engines.errors import EnginesError
from engines.keys import TrustStore, normalise_key_id
from engines.manifest import Manifest, check_site_thresholds
from engines.reference import (  # noqa: F401 - DEMO_PUBLIC_KEY, REFERENCE_DIR, reference_bundles: re-exported
    DEMO_PUBLIC_KEY,
    REFERENCE_DIR,
    demo_key,
    publicly_known_key_ids,
    reference_bundles,
)
from engines.registry import Registry
from engines.runtime import CompileResult

log = get_logger(__name__)


def trust_store(settings: Settings) -> TrustStore:
    """Trusted keys from config, minus revoked ones; key ids normalised (lower-case hex).

    A key whose private half is public (the demo key) is trusted ONLY when ``engines.trust_demo_key`` is set
    (``appliance demo``, tests): listed in ``trusted_keys`` without it, it is left out and logged as an error
    (``appliance config check`` reports it too)."""
    e = settings.engines
    public_private = publicly_known_key_ids()
    keys: dict[str, str] = {}
    for raw, b64 in e.trusted_keys.items():
        kid = normalise_key_id(raw, what="engines.trusted_keys key id")
        if kid in public_private and not e.trust_demo_key:
            log.error("publicly known signing key not trusted", key_id=kid, setting="engines.trusted_keys")
            continue
        keys[kid] = b64
    if e.trust_demo_key:
        kid, b64 = demo_key()
        keys.setdefault(kid, b64)
    return TrustStore.from_config(keys, e.revoked_keys)


def engine_options(settings: Settings) -> runtime.EngineOptions:
    """The engines section as runtime options (each backend's own options via ``plugin_options``)."""
    e = settings.engines
    return runtime.EngineOptions(
        backend=e.backend,
        precision=e.precision,
        max_batch=e.max_batch,
        appliance_version=__version__,
        plugins=e.plugin_options(),
    )


def registry(settings: Settings) -> Registry:
    return Registry(settings.models_dir, trust_store(settings))


def ensure_reference_bundles(settings: Settings) -> list[str]:
    """Install + activate each shipped reference bundle whose id has never been installed here, only when the
    operator opted in (``engines.install_reference_bundles``; they are signed by the DEMO key, so they install
    only where ``engines.trust_demo_key`` is set too).

    A bundle id the box already knows (e.g. the central team sent a newer version) is left alone. A
    reference bundle that fails (e.g. its golden check on this hardware) is logged and skipped, not fatal.
    Returns "id@version" of what was installed.
    """
    if not settings.engines.install_reference_bundles:
        return []
    reg = registry(settings)
    done = []
    for path in reference_bundles():
        try:
            m = read_manifest_unverified(path)
            if reg.state(m.bundle_id)["installed"]:
                continue
            runtime.install_bundle(settings.models_dir, path, reg.trust, engine_options(settings))
            done.append(f"{m.bundle_id}@{m.version}")
            log.info("reference bundle installed", bundle=m.bundle_id, version=m.version, clinical_use=False)
        except EnginesError as exc:
            log.error("reference bundle refused", file=path.name, reason=exc.reason, error=str(exc))
    return done


class ActiveEngines:
    """The pipeline's bundle source: every active bundle with one loaded engine (created once, reused).

    ``active()`` re-reads the registry each call, so a model update or a rollback takes effect at the next
    study: the engine is (re)loaded when the active version changes. A version whose engine cannot be
    loaded (failed golden check, corrupt files) is left out with a logged reason and not retried, so its
    studies end as ``no_model`` instead of failing one by one. With ``install_reference`` the shipped
    reference bundles are installed on the first call (when ``engines.install_reference_bundles``).
    """

    def __init__(self, settings: Settings, install_reference: bool = False):
        self.settings = settings
        self._install_reference = install_reference
        self._engines: dict[str, CompileResult] = {}
        self._failed: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        self.on_change: list[Callable[[], None]] = []  # called after an engine was loaded or replaced

    def _load(self, reg: Registry, bundle_id: str, version: str) -> CompileResult | None:
        try:
            res = runtime.compile_engine(
                self.settings.models_dir, bundle_id, engine_options(self.settings), version=version, trust=reg.trust
            )
        except Exception as exc:  # EnginesError with a reason, or anything a broken bundle raises
            self._failed[(bundle_id, version)] = str(exc)
            log.error("engine not loaded", bundle=bundle_id, version=version, error=str(exc))
            return None
        log.info(
            "engine loaded",
            bundle=bundle_id,
            version=res.version,
            backend=res.backend,
            precision=res.precision,
            cache_hit=res.cache_hit,
            max_batch=res.engine.max_batch,
        )
        return res

    def active(self) -> list[tuple[Manifest, Engine]]:
        with self._lock:
            if self._install_reference:
                self._install_reference = False
                ensure_reference_bundles(self.settings)
            reg = registry(self.settings)
            out = []
            changed = False
            for bundle_id in reg.bundle_ids():
                version = reg.active_version(bundle_id)
                if version is None or (bundle_id, version) in self._failed:
                    continue
                cached = self._engines.get(bundle_id)
                if cached is None or cached.version != version:
                    loaded = self._load(reg, bundle_id, version)
                    if loaded is None:
                        continue
                    if cached is not None:
                        cached.engine.close()
                    cached = self._engines[bundle_id] = loaded
                    changed = True
                out.append((cached.manifest, cached.engine))
        if changed:
            for callback in self.on_change:
                callback()
        return out

    def describe(self) -> dict[str, Any]:
        """What is loaded, for the device twin: active bundles and the backend each runs on."""
        with self._lock:
            loaded = [
                {
                    "bundle_id": r.manifest.bundle_id,
                    "version": r.version,
                    "backend": r.backend,
                    "precision": r.precision,
                }
                for r in self._engines.values()
            ]
        backends = sorted({b["backend"] for b in loaded})
        return {"bundles_active": loaded, "backend": ",".join(backends) or self.settings.engines.backend}

    def close(self) -> None:
        with self._lock:
            for res in self._engines.values():
                res.engine.close()
            self._engines.clear()


def load_active_engines(settings: Settings) -> dict[str, tuple[Manifest, Engine]]:
    """Every installed bundle's active version, verified, compiled (or from cache) and golden-checked.

    A bundle that cannot be loaded is logged with its reason and left out; the others still load. The
    caller owns the engines (:func:`close_engines`).
    """
    return {m.bundle_id: (m, e) for m, e in ActiveEngines(settings).active()}


def close_engines(engines: dict[str, tuple[Manifest, Engine]]) -> None:
    for _, engine in engines.values():
        engine.close()


def rollback(settings: Settings, bundle_id: str) -> dict[str, str | None]:
    """Switch ``bundle_id`` back to its previous version (the running pipeline picks it up at the next
    study). Raises EnginesError (``no_previous``, ``not_installed``) with a reason."""
    reg = registry(settings)
    before = reg.active_version(bundle_id)
    now_active = reg.rollback(bundle_id)
    log.warning("model rolled back", bundle=bundle_id, from_version=before, to_version=now_active)
    return {"bundle_id": bundle_id, "from_version": before, "active_version": now_active}


def check_operating_point(settings: Settings, bundle_id: str, thresholds: Mapping[str, float]) -> None:
    """Raise ValueError unless the active version of ``bundle_id`` (its installed, signed manifest) allows these
    site thresholds (:func:`engines.manifest.check_site_thresholds`): an unknown or inactive bundle, a label it
    does not have or allows no site threshold for, or a threshold outside its ``threshold_range`` is refused."""
    try:
        manifest = registry(settings).manifest(bundle_id)
    except (EnginesError, OSError, ValueError) as exc:
        raise ValueError(f"bundle {bundle_id!r} has no active version on this box ({exc})") from exc
    check_site_thresholds(manifest, dict(thresholds))
