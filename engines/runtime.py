"""The one entry the appliance calls: a verified, compiled, golden-checked engine for a bundle.

``load_engine(models_dir, bundle_id, options)``: re-verify the installed bundle on disk, pick the backend,
take the compiled artefact from the cache (or build it: ORT graph optimisation, or a TensorRT plan), load
it, run the golden inputs. An engine that fails the golden check is closed, its cache entry deleted, the
failure recorded in the registry, and :class:`GoldenCheckError` raised: it is never used or activated.

``install_bundle(...)`` and ``activate_checked(...)`` are the update path: a new version is activated only
after it compiled and passed its golden check on THIS hardware.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engines.backends import select_backend
from engines.backends.base import Engine
from engines.bundle import Limits, Verified, verify_dir
from engines.cache import CacheKey, EngineCache, cpu_fingerprint
from engines.errors import EngineBuildError, GoldenCheckError
from engines.golden import GoldenReport, check_engine
from engines.keys import TrustStore
from engines.manifest import Manifest
from engines.registry import Registry

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass(frozen=True)
class EngineOptions:
    backend: str = "auto"  # auto | ort | tensorrt
    precision: str = "auto"  # auto | fp32 | fp16 (TensorRT; ORT is always fp32)
    ort_intra_op_threads: int = 0
    ort_inter_op_threads: int = 1
    trt_workspace_mib: int = 1024
    max_batch: int = 8
    opt_batch: int = 1
    appliance_version: str | None = None


@dataclass
class CompileResult:
    engine: Engine
    manifest: Manifest
    version: str
    backend: str
    precision: str
    cache_hit: bool
    cache_note: str
    golden: GoldenReport
    artefact: Path


def _key(verified: Verified, backend: str, options: EngineOptions) -> CacheKey:
    if backend == "tensorrt":
        from engines.backends import tensorrt

        return CacheKey(
            verified.digest,
            "tensorrt",
            tensorrt.trt_version(),
            tensorrt.gpu_fingerprint(),
            options.precision,
            {
                "max_batch": options.max_batch,
                "opt_batch": options.opt_batch,
                "workspace_mib": options.trt_workspace_mib,
            },
        )
    from engines.backends.ort import ort_version

    return CacheKey(
        verified.digest,
        "ort",
        ort_version(),
        cpu_fingerprint(),
        "fp32",
        {"intra": options.ort_intra_op_threads, "inter": options.ort_inter_op_threads},
    )


def _build(backend: str, onnx: Path, out: Path, options: EngineOptions, bid: str, progress: Progress | None) -> str:
    """Compile ``onnx`` to ``out``; returns the precision actually used."""
    if backend == "tensorrt":
        from engines.backends import tensorrt

        timing = out.parent.parent / "trt-timing.cache"
        return tensorrt.build_plan(
            onnx,
            out,
            precision=options.precision,
            workspace_mib=options.trt_workspace_mib,
            max_batch=options.max_batch,
            opt_batch=options.opt_batch,
            timing_cache_path=timing,
            progress=progress,
            bundle=bid,
        )
    from engines.backends.ort import compile_ort

    if progress:
        progress("optimise", 0, 1)
    compile_ort(
        onnx,
        out,
        intra_op_threads=options.ort_intra_op_threads,
        inter_op_threads=options.ort_inter_op_threads,
        bundle=bid,
    )
    if progress:
        progress("optimise", 1, 1)
    return "fp32"


def _open(backend: str, artefact: Path, options: EngineOptions, bid: str) -> Engine:
    if backend == "tensorrt":
        from engines.backends.tensorrt import TrtEngine

        return TrtEngine(artefact, max_batch=options.max_batch, bundle=bid)
    from engines.backends.ort import OrtEngine

    return OrtEngine(
        artefact,
        intra_op_threads=options.ort_intra_op_threads,
        inter_op_threads=options.ort_inter_op_threads,
        max_batch=options.max_batch,
        optimised=True,
        bundle=bid,
    )


def compile_engine(
    models_dir: Path,
    bundle_id: str,
    options: EngineOptions = EngineOptions(),
    *,
    version: str | None = None,
    trust: TrustStore | None = None,
    rebuild: bool = False,
    progress: Progress | None = None,
) -> CompileResult:
    """Verify, compile-or-load from cache, golden-check. Raises EnginesError subclasses with a reason."""
    models_dir = Path(models_dir)
    registry = Registry(models_dir, trust)
    vdir = registry.version_dir(bundle_id, version)
    verified = verify_dir(vdir, trust, appliance_version=options.appliance_version)
    m = verified.manifest
    bid = f"{m.bundle_id}@{m.version}"
    backend = select_backend(options.backend)
    cache = EngineCache(models_dir / "cache")
    key = _key(verified, backend, options)
    if rebuild:
        cache.invalidate(m.bundle_id, key)
    artefact, note = cache.lookup(m.bundle_id, key)
    engine: Engine | None = None
    hit = artefact is not None
    precision = key.precision
    if artefact is not None:
        try:
            engine = _open(backend, artefact, options, bid)
            precision = _entry_precision(cache, m.bundle_id, key) or precision
        except EngineBuildError as exc:  # e.g. a plan from another TensorRT: rebuild, never fatal
            log.warning("cached engine for %s unusable (%s), rebuilding", bid, exc)
            cache.invalidate(m.bundle_id, key)
            note, hit, engine = f"cached engine unusable: {exc.reason}", False, None
    if engine is None:
        cache.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".build-", dir=cache.root) as tmp:
            out = Path(tmp) / "artefact"
            try:
                precision = _build(backend, vdir / "model.onnx", out, options, bid, progress)
            except EngineBuildError as exc:
                registry.record_failure(m.bundle_id, m.version, exc.reason, str(exc))
                raise
            artefact = cache.store(m.bundle_id, key, out, {"precision": precision, "bundle": bid})
        engine = _open(backend, artefact, options, bid)
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
    trust: TrustStore | None = None,
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
