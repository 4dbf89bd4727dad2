"""The appliance's side of the engines: trust and options from config, reference bundles, active engines.

Why here: ``engines`` knows nothing of the appliance's config. This module turns ``EnginesConfig`` into the
engines' trust store and options, installs the shipped reference bundles on first run, and gives the
pipeline one call, :func:`load_active_engines`, that returns every active bundle ready to run.
"""

from __future__ import annotations

from pathlib import Path

from appliance import __version__
from appliance.config import Settings
from appliance.logs import get_logger
from engines import runtime
from engines.backends.base import Engine
from engines.bundle import read_manifest_unverified
from engines.errors import EnginesError
from engines.keys import TrustStore, read_public_key_file
from engines.manifest import Manifest
from engines.registry import Registry

log = get_logger(__name__)

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "engines" / "reference"
DEMO_PUBLIC_KEY = REFERENCE_DIR / "keys" / "DEMO-ONLY.pub"


def demo_key() -> tuple[str, str]:
    """(key id, base64 public key) of the DEMO key that signs the reference bundles."""
    return read_public_key_file(DEMO_PUBLIC_KEY)


def trust_store(settings: Settings) -> TrustStore:
    """Trusted keys from config (+ the demo key when ``trust_demo_key``), minus revoked ones."""
    e = settings.engines
    keys = dict(e.trusted_keys)
    if e.trust_demo_key:
        kid, b64 = demo_key()
        keys.setdefault(kid, b64)
    return TrustStore.from_config(keys, e.revoked_keys)


def engine_options(settings: Settings) -> runtime.EngineOptions:
    e = settings.engines
    return runtime.EngineOptions(
        backend=e.backend,
        precision=e.precision,
        ort_intra_op_threads=e.ort_intra_op_threads,
        ort_inter_op_threads=e.ort_inter_op_threads,
        trt_workspace_mib=e.trt_workspace_mib,
        max_batch=e.max_batch,
        appliance_version=__version__,
    )


def registry(settings: Settings) -> Registry:
    return Registry(settings.models_dir, trust_store(settings))


def reference_bundles() -> list[Path]:
    return sorted((REFERENCE_DIR / "bundles").glob("*.bundle"))


def ensure_reference_bundles(settings: Settings) -> list[str]:
    """Install + activate each shipped reference bundle whose id has never been installed here.

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
            runtime.install_bundle(settings.models_dir, path, reg.trust, engine_options(settings))  # type: ignore[arg-type]
            done.append(f"{m.bundle_id}@{m.version}")
            log.info("reference bundle installed", bundle=m.bundle_id, version=m.version, clinical_use=False)
        except EnginesError as exc:
            log.error("reference bundle refused", file=path.name, reason=exc.reason, error=str(exc))
    return done


def load_active_engines(settings: Settings) -> dict[str, tuple[Manifest, Engine]]:
    """Every installed bundle's active version, verified, compiled (or from cache) and golden-checked.

    A bundle that cannot be loaded is logged with its reason and left out; the others still load.
    """
    reg = registry(settings)
    options = engine_options(settings)
    out: dict[str, tuple[Manifest, Engine]] = {}
    for bundle_id in reg.bundle_ids():
        if reg.active_version(bundle_id) is None:
            continue
        try:
            res = runtime.compile_engine(settings.models_dir, bundle_id, options, trust=reg.trust)
        except EnginesError as exc:
            log.error("engine not loaded", bundle=bundle_id, reason=exc.reason, error=str(exc))
            continue
        out[bundle_id] = (res.manifest, res.engine)
        log.info(
            "engine loaded",
            bundle=bundle_id,
            version=res.version,
            backend=res.backend,
            precision=res.precision,
            cache_hit=res.cache_hit,
        )
    return out


def close_engines(engines: dict[str, tuple[Manifest, Engine]]) -> None:
    for _, engine in engines.values():
        engine.close()
