"""The pipeline's daemon services: early preparation, the inference worker and the exporter, wired to the
receiver and the study assembler."""

from __future__ import annotations

from typing import Any

from appliance.core.config import Settings
from appliance.core.store import Store
from appliance.delivery.export import Exporter
from appliance.models.active import ActiveEngines
from appliance.pipeline.prepare_early import EarlyPreparer, PreparedCache
from appliance.pipeline.worker import BundleSource, PipelineWorker


def build_pipeline_services(
    settings: Settings,
    store: Store,
    assembler: Any | None = None,
    bundles: BundleSource | None = None,
    scp: Any | None = None,
) -> list[Any]:
    """[exporter, early preparer, worker] in start order; the assembler's on_complete wakes the worker at
    once, and the worker hands each study's SR to the exporter (``send_now``) before it renders the SCs.

    With ``scp`` (and ``pipeline.early_prepare``) every arriving instance is prepared for its bundles while the
    study is still arriving (``prepare_early``); the worker takes those from the shared cache.
    ``bundles`` defaults to the registry's active bundles (reference bundles installed on first run).
    """
    p = settings.pipeline
    if not p.enabled:
        return []
    exporter = Exporter(settings, store)
    source = bundles if bundles is not None else ActiveEngines(settings, install_reference=True)
    early: list[Any] = []
    cache = None
    if p.early_prepare and scp is not None and hasattr(scp, "on_instance"):
        cache = PreparedCache(p.early_cache_mb * 2**20)
        receiving = getattr(scp, "active_associations", None)
        preparer = EarlyPreparer(settings, source, cache, (lambda: receiving() > 0) if receiving else None)
        scp.on_instance.append(preparer.submit)
        early.append(preparer)
    worker = PipelineWorker(
        settings, store, source, on_results=exporter.wake, on_sr_queued=exporter.send_now, prepared=cache
    )
    if assembler is not None and hasattr(assembler, "on_complete"):
        assembler.on_complete.append(lambda _study_id: worker.wake())
    return [exporter, *early, worker]
