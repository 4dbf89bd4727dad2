"""The pipeline's daemon services: the inference worker and the exporter, wired to the study assembler."""

from __future__ import annotations

from typing import Any

from appliance.config import Settings
from appliance.models import ActiveEngines
from appliance.pipeline.export import Exporter
from appliance.pipeline.worker import BundleSource, PipelineWorker
from appliance.store import Store


def build_pipeline_services(
    settings: Settings, store: Store, assembler: Any | None = None, bundles: BundleSource | None = None
) -> list[Any]:
    """[exporter, worker] in start order; the assembler's on_complete wakes the worker at once, and the
    worker hands each study's SR to the exporter (``send_now``) before it renders the SCs.

    ``bundles`` defaults to the registry's active bundles (reference bundles installed on first run).
    """
    if not settings.pipeline.enabled:
        return []
    exporter = Exporter(settings, store)
    source = bundles if bundles is not None else ActiveEngines(settings, install_reference=True)
    worker = PipelineWorker(settings, store, source, on_results=exporter.wake, on_sr_queued=exporter.send_now)
    if assembler is not None and hasattr(assembler, "on_complete"):
        assembler.on_complete.append(lambda _study_id: worker.wake())
    return [exporter, worker]
