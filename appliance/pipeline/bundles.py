"""The active bundles from the engines registry, each with one loaded engine (created once, reused).

An engine is (re)loaded when the registry's active version changes (model update or rollback); a bundle
whose engine cannot be loaded (failed golden check, corrupt files) is left out with a logged reason, so
its studies end as ``no_model`` rather than crashing the worker.
"""

from __future__ import annotations

import threading
from typing import Any

from appliance import __version__
from appliance.config import Settings
from appliance.logs import get_logger
from engines.keys import TrustStore
from engines.manifest import Manifest
from engines.registry import Registry
from engines.runtime import EngineOptions, load_engine

log = get_logger(__name__)


def trust_store(settings: Settings) -> TrustStore:
    return TrustStore.from_config(settings.engines.trusted_keys, settings.engines.revoked_keys)


def engine_options(settings: Settings) -> EngineOptions:
    e = settings.engines
    return EngineOptions(
        backend=e.backend,
        precision=e.precision,
        ort_intra_op_threads=e.ort_intra_op_threads,
        ort_inter_op_threads=e.ort_inter_op_threads,
        trt_workspace_mib=e.trt_workspace_mib,
        appliance_version=__version__,
    )


class RegistryBundles:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._engines: dict[str, tuple[str, Manifest, Any]] = {}
        self._failed: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def active(self) -> list[tuple[Manifest, Any]]:
        trust = trust_store(self.settings)
        registry = Registry(self.settings.models_dir, trust)
        out = []
        with self._lock:
            for bid in registry.bundle_ids():
                version = registry.active_version(bid)
                if version is None or (bid, version) in self._failed:
                    continue
                cached = self._engines.get(bid)
                if cached is None or cached[0] != version:
                    try:
                        engine = load_engine(
                            self.settings.models_dir, bid, engine_options(self.settings), trust=trust, version=version
                        )
                        manifest = registry.manifest(bid, version)
                    except Exception as exc:
                        self._failed[(bid, version)] = str(exc)
                        log.error("bundle engine not loadable", bundle=bid, version=version, error=str(exc))
                        continue
                    if cached is not None:
                        cached[2].close()
                    cached = self._engines[bid] = (version, manifest, engine)
                    log.info("engine loaded", bundle=bid, version=version, max_batch=engine.max_batch)
                out.append((cached[1], cached[2]))
        return out

    def close(self) -> None:
        with self._lock:
            for _, _, engine in self._engines.values():
                engine.close()
            self._engines.clear()
