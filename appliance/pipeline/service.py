"""The pipeline's daemon services: the inference worker and the exporter, wired to the study assembler."""

from __future__ import annotations

from typing import Any

from appliance.config import Settings
from appliance.pipeline.bundles import RegistryBundles
from appliance.pipeline.export import Exporter
from appliance.pipeline.worker import PipelineWorker
from appliance.store import Store


def build_pipeline_services(settings: Settings, store: Store, assembler: Any | None = None) -> list[Any]:
    """[worker, exporter] in start order; the assembler's on_complete wakes the worker at once."""
    if not settings.pipeline.enabled:
        return []
    exporter = Exporter(settings, store)
    worker = PipelineWorker(settings, store, RegistryBundles(settings), on_results=exporter.wake)
    if assembler is not None and hasattr(assembler, "on_complete"):
        assembler.on_complete.append(lambda _study_id: worker.wake())
    return [exporter, worker]
