"""The one entry the appliance calls: a verified, compiled, golden-checked engine for a bundle.

``load_engine(models_dir, bundle_id, options)``: re-verify the installed bundle on disk, ask the backend
registry (:mod:`engines.backends.registry`) for the plugin, take the compiled artefact from the cache (or
have the plugin build it), have the plugin load it, run the golden inputs. Nothing here knows a backend by
name: the plugin supplies availability, the cache key fields, the build and the load. An engine that fails
the golden check is closed, its cache entry deleted, the failure recorded in the registry, and
:class:`GoldenCheckError` raised: it is never used or activated.

``install_bundle(...)`` and ``activate_checked(...)`` are the update path: a new version is activated only
after it compiled and passed its golden check on THIS hardware.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.backends import registry as backends
from engines.backends.base import BackendPlugin, BuildContext, Engine, Profile, Progress
from engines.bundle import Limits, Verified, verify_dir
from engines.cache import CacheKey, EngineCache
from engines.errors import EngineBuildError, GoldenCheckError
from engines.golden import GoldenReport, check_engine
from engines.keys import TrustStore
from engines.manifest import Manifest
from engines.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    """How to build and run engines. ``backend``: "auto" or a registered type key
    (:func:`engines.backends.registry.names`); ``precision`` (auto | fp32 | fp16), ``max_batch`` and
    ``opt_batch`` are shared by every backend; ``plugins`` maps a type key to that backend's own options
    (validated by its ``Config`` model; missing = its defaults)."""

    backend: str = "auto"
    precision: str = "auto"
    max_batch: int = 8
    opt_batch: int = 1
    appliance_version: str | None = None
    plugins: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def profile(self) -> Profile:
        """The shared build profile every plugin receives."""
        return Profile(precision=self.precision, max_batch=self.max_batch, opt_batch=self.opt_batch)


@dataclass
class CompileResult:
    """A ready engine and how it came to be: ``backend`` is the plugin's type key, ``precision`` the one
    actually built, ``cache_hit``/``cache_note`` whether the artefact came from the cache (and why not)."""

    engine: Engine
    manifest: Manifest
    version: str
    backend: str
    precision: str
    cache_hit: bool
    cache_note: str
    golden: GoldenReport
    artefact: Path


def _key(verified: Verified, plugin: BackendPlugin) -> CacheKey:
    f = plugin.key_fields()
    return CacheKey(verified.digest, plugin.type_key, f.backend_version, f.hardware, f.precision, f.profile)


def compile_engine(
    models_dir: Path,
    bundle_id: str,
    options: EngineOptions = EngineOptions(),
    *,
    version: str | None = None,
    trust: TrustStore,
    rebuild: bool = False,
    progress: Progress | None = None,
) -> CompileResult:
    """Verify, compile-or-load from cache, golden-check. ``trust`` is required (signatures are re-checked at every
    load; there is no unsigned mode). Raises EnginesError subclasses with a reason."""
    models_dir = Path(models_dir)
    registry = Registry(models_dir, trust)
    vdir = registry.version_dir(bundle_id, version)
    verified = verify_dir(vdir, trust, appliance_version=options.appliance_version)
    m = verified.manifest
    bid = f"{m.bundle_id}@{m.version}"
    plugin = backends.create(options.backend, options.plugins, options.profile())
    backend = plugin.type_key
    cache = EngineCache(models_dir / "cache")
    key = _key(verified, plugin)
    ctx = BuildContext(bundle=bid, state_dir=cache.root, progress=progress)
    if rebuild:
        cache.invalidate(m.bundle_id, key)
    artefact, note = cache.lookup(m.bundle_id, key)
    engine: Engine | None = None
    hit = artefact is not None
    precision = key.precision
    if artefact is not None:
        try:
            engine = plugin.load(artefact, ctx)
            precision = _entry_precision(cache, m.bundle_id, key) or precision
        except EngineBuildError as exc:  # e.g. a plan from another TensorRT: rebuild, never fatal
            log.warning("cached engine for %s unusable (%s), rebuilding", bid, exc)
            cache.invalidate(m.bundle_id, key)
            note, hit, engine = f"cached engine unusable: {exc.reason}", False, None
    if engine is None or artefact is None:
        cache.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".build-", dir=cache.root) as tmp:
            out = Path(tmp) / "artefact"
            try:
                precision = plugin.build(vdir / "model.onnx", out, ctx)
            except EngineBuildError as exc:
                registry.record_failure(m.bundle_id, m.version, exc.reason, str(exc))
                raise
            artefact = cache.store(m.bundle_id, key, out, {"precision": precision, "bundle": bid})
        engine = plugin.load(artefact, ctx)
    report = check_engine(engine, vdir / "golden.npz", m, precision)
    cache.update_info(m.bundle_id, key, {"golden": report.as_dict()})
    if not report.passed:
        engine.close()
        cache.invalidate(m.bundle_id, key)
        registry.record_failure(m.bundle_id, m.version, "golden_mismatch", report.summary())
        raise GoldenCheckError(
            f"{backend}/{precision} engine fails its golden check: {report.summary()}",
            bundle=bid,
            report=report.as_dict(),
        )
    engine.bundle_id, engine.bundle_version, engine.precision = m.bundle_id, m.version, precision  # type: ignore[attr-defined]
    log.info("engine ready %s backend=%s precision=%s cache_hit=%s", bid, backend, precision, hit)
    return CompileResult(engine, m, m.version, backend, precision, hit, note, report, artefact)


def _entry_precision(cache: EngineCache, bundle_id: str, key: CacheKey) -> str | None:
    import json

    try:
        return json.loads((cache.entry_dir(bundle_id, key) / EngineCache.ENTRY).read_text())["precision"]
    except (OSError, ValueError, KeyError):
        return None


def load_engine(
    models_dir: Path,
    bundle_id: str,
    options: EngineOptions = EngineOptions(),
    *,
    trust: TrustStore,
    version: str | None = None,
) -> Engine:
    """The active (or given) version of ``bundle_id`` as a ready, golden-checked :class:`Engine`."""
    return compile_engine(models_dir, bundle_id, options, version=version, trust=trust).engine


def activate_checked(
    models_dir: Path,
    bundle_id: str,
    version: str,
    trust: TrustStore,
    options: EngineOptions = EngineOptions(),
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> CompileResult:
    """Compile + golden-check ``version`` on this hardware, then make it active. Failing versions never are."""
    registry = Registry(models_dir, trust)
    if force:
        registry.clear_failure(bundle_id, version)
    result = compile_engine(models_dir, bundle_id, options, version=version, trust=trust, progress=progress)
    registry.activate(bundle_id, version, force=force)
    return result


def install_bundle(
    models_dir: Path,
    bundle_path: Path,
    trust: TrustStore,
    options: EngineOptions = EngineOptions(),
    *,
    activate: bool = True,
    force: bool = False,
    limits: Limits = Limits(),
    progress: Progress | None = None,
) -> Verified:
    """Verify + install a bundle file and (by default) activate it once its engine passed the golden check."""
    registry = Registry(models_dir, trust)
    verified = registry.install(bundle_path, force=force, limits=limits, appliance_version=options.appliance_version)
    if activate:
        m = verified.manifest
        result = activate_checked(models_dir, m.bundle_id, m.version, trust, options, force=force, progress=progress)
        result.engine.close()
    return verified
