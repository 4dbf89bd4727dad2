"""Prometheus metrics of the appliance (``/metrics``), in the text exposition format of ``prometheus-client``.

One :class:`ApplianceMetrics` per daemon, with its own ``CollectorRegistry`` (no process globals). Counts are
read from the state database at each scrape, so they survive restarts and agree with ``appliance studies``:

- ``appliance_studies_received_total``: study revisions received; ``appliance_studies_processed_total``,
  ``..._failed_total``, ``..._no_model_total``, ``..._not_analysed_total``, ``..._not_processable_total``: revisions
  that ever reached ``inferred``, ``failed``, ``no_model``, ``not_analysed``, ``not_processable`` (from
  ``study_events``; a retried study counts once);
- ``appliance_images_refused_total{category}``: images a bundle's input gate refused, by refusal category
  (``router.REFUSAL_CATEGORIES``, a bounded set), from the results' ``not_applied`` lists (a re-run counts once);
- ``appliance_studies{state}``: revisions in each state now;
- ``appliance_queue_depth{queue}``: ``assembling`` (received, not complete), ``analysis`` (complete or
  inferring); ``appliance_export_backlog``: result objects not yet accepted by a PACS destination;
  ``appliance_outbox_messages`` / ``appliance_outbox_bytes``: cloud messages waiting;
- ``appliance_disk_free_bytes`` (the state directory's file system); ``appliance_cloud_enabled``,
  ``appliance_cloud_connected`` (0/1); ``appliance_models_loaded``: active bundles with a loaded engine;
- ``appliance_inference_seconds{bundle_id}``: histogram of each bundle's inference time per study
  (engine calls only, not preparation or result building), observed by the pipeline through
  :meth:`ApplianceMetrics.observe_analysis` since the daemon started.

No metric carries a patient, study or user identifier, which is why ``/metrics`` is served without login
(as Prometheus scrapers expect); bind the API to an address only the clinic network reaches.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.core.config import Settings
from appliance.core.store import Store
from appliance.pipeline.router import REFUSAL_CATEGORIES

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ENDED_STATES = ("inferred", "failed", "no_model", "not_analysed", "not_processable")
_ENDED_NAMES = {"inferred": "processed"}


class _StateCollector(Collector):
    """Reads the gauges and counters derived from the database at each scrape."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        cloud: Callable[[], Mapping[str, Any] | None],
        engines: Callable[[], Mapping[str, Any]],
    ):
        self.settings = settings
        self.store = store
        self.cloud = cloud
        self.engines = engines

    def collect(self) -> Iterator[Metric]:
        q = self.store.query
        received = q("SELECT COUNT(*) FROM studies")[0][0]
        yield CounterMetricFamily("appliance_studies_received", "Study revisions received", value=received)
        ended = {
            r[0]: r[1]
            for r in q(
                "SELECT to_state, COUNT(DISTINCT study_id) FROM study_events WHERE to_state IN (?,?,?,?,?)"
                " GROUP BY to_state",
                ENDED_STATES,
            )
        }
        for state in ENDED_STATES:
            name = _ENDED_NAMES.get(state, state)
            yield CounterMetricFamily(
                f"appliance_studies_{name}",
                f"Study revisions that reached {state}",
                value=ended.get(state, 0),
            )
        refused = {
            r[0]: r[1]
            for r in q(
                "SELECT json_extract(j.value, '$.category'), COUNT(*) FROM results,"
                " json_each(results.summary, '$.not_applied') AS j WHERE json_valid(results.summary) GROUP BY 1"
            )
        }
        refusals = CounterMetricFamily(
            "appliance_images_refused",
            "Images a bundle's input gate refused (named in its results, never analysed), by refusal category",
            labels=["category"],
        )
        for category in REFUSAL_CATEGORIES:  # a bounded label set: the router's categories, never free text
            refusals.add_metric([category], refused.get(category, 0))
        yield refusals
        by_state = GaugeMetricFamily("appliance_studies", "Study revisions in each state now", labels=["state"])
        counts = self.store.state_counts()
        for state, n in sorted(counts.items()):
            by_state.add_metric([state], n)
        yield by_state
        depth = GaugeMetricFamily("appliance_queue_depth", "Studies waiting, by queue", labels=["queue"])
        depth.add_metric(["assembling"], counts.get("received", 0))
        depth.add_metric(["analysis"], counts.get("complete", 0) + counts.get("inferring", 0))
        yield depth
        backlog = q("SELECT COUNT(*) FROM exports WHERE state != 'done'")[0][0]
        yield GaugeMetricFamily("appliance_export_backlog", "Result objects not yet accepted by a PACS", value=backlog)
        rows = q("SELECT count, bytes FROM outbox_totals WHERE id=1")
        messages, size = (rows[0][0], rows[0][1]) if rows else (0, 0)
        yield GaugeMetricFamily("appliance_outbox_messages", "Cloud messages waiting to be sent", value=messages)
        yield GaugeMetricFamily("appliance_outbox_bytes", "Bytes of cloud messages waiting", value=size)
        path = self.settings.state_dir if self.settings.state_dir.exists() else self.settings.state_dir.parent
        yield GaugeMetricFamily(
            "appliance_disk_free_bytes",
            "Free bytes on the state directory's file system",
            value=shutil.disk_usage(path).free,
        )
        cloud = self.cloud()
        yield GaugeMetricFamily(
            "appliance_cloud_enabled", "1 when cloud sync is configured", value=int(cloud is not None)
        )
        yield GaugeMetricFamily(
            "appliance_cloud_connected",
            "1 while connected to the IoT Hub",
            value=int(bool(cloud and cloud.get("connected"))),
        )
        loaded = len(self.engines().get("bundles_active", []))
        yield GaugeMetricFamily("appliance_models_loaded", "Active bundles with a loaded engine", value=loaded)


class ApplianceMetrics:
    """The daemon's metrics: a private registry with the database-derived collector and the latency histogram.

    ``observe_analysis`` is the pipeline's port (``PipelineWorker(on_analysed=...)``); ``bind`` attaches the
    database collector once the web service knows its callables; ``exposition()`` renders the text format.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.inference_seconds = Histogram(
            "appliance_inference_seconds",
            "Inference time of one bundle on one study (engine calls), seconds",
            ["bundle_id"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._bound = False

    def observe_analysis(self, bundle_id: str, version: str, timings: Mapping[str, float]) -> None:
        """One bundle analysed one study: record its ``timings["inference"]`` (seconds), if present."""
        seconds = timings.get("inference")
        if seconds is not None:
            self.inference_seconds.labels(bundle_id=bundle_id).observe(seconds)

    def bind(
        self,
        settings: Settings,
        store: Store,
        cloud: Callable[[], Mapping[str, Any] | None],
        engines: Callable[[], Mapping[str, Any]],
    ) -> None:
        """Register the database-derived collector (once)."""
        if not self._bound:
            self.registry.register(_StateCollector(settings, store, cloud, engines))
            self._bound = True

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format (version 0.0.4)."""
        return generate_latest(self.registry)
