"""Prometheus metrics of the appliance (``/metrics``), in the text exposition format of ``prometheus-client``.

One :class:`ApplianceMetrics` per daemon, with its own ``CollectorRegistry`` (no process globals). Counts are
read from the state database at each scrape, so they survive restarts and agree with ``appliance studies``:

- ``appliance_studies_received_total``: study revisions received; ``appliance_studies_processed_total``,
  ``..._failed_total``, ``..._no_model_total``, ``..._not_analysed_total``, ``..._not_processable_total``: revisions
  that ever reached ``inferred``, ``failed``, ``no_model``, ``not_analysed``, ``not_processable`` (from
  ``study_events``; a retried study counts once);
- ``appliance_studies{state}``: revisions in each state now;
- ``appliance_queue_depth{queue}``: ``assembling`` (received, not complete), ``analysis`` (complete or
  inferring); ``appliance_export_backlog``: result objects not yet accepted by a PACS destination;
  ``appliance_outbox_messages`` / ``appliance_outbox_bytes``: cloud messages waiting;
- ``appliance_disk_free_bytes`` (the state directory's file system); ``appliance_cloud_enabled``,
  ``appliance_cloud_connected`` (0/1); ``appliance_models_loaded``: active bundles with a loaded engine;
- ``appliance_inference_seconds{bundle_id}``: histogram of each bundle's inference time per study
  (engine calls only, not preparation or result building), observed by the pipeline through
  :meth:`ApplianceMetrics.observe_analysis` since the daemon started.

- per bundle version (labels ``bundle``, ``version``; ``label`` = an output label of the bundle, ``category`` = a
  refusal category, ``metric`` = a drift metric; all bounded), from ``bundle_stats`` (``appliance.models.stats``,
  every day summed, so they only grow): histograms ``appliance_model_score{label}``, ``appliance_model_study_score``,
  ``appliance_model_input_mean``, ``appliance_model_input_p95`` (20 buckets of 0.05 over [0, 1]); counters
  ``appliance_model_studies_total``, ``..._images_total``, ``..._not_analysed_total``,
  ``..._positives_total{label}``, ``..._refusals_total{category}`` (images the input gate refused by
  ``router.Refusal.category``, or preprocessing could not use); gauges ``appliance_model_drift_psi{metric}``
  and ``appliance_model_drift_alert`` (0/1) from the latest drift evaluation against the bundle's reference.

No metric carries a patient, study or user identifier, which is why ``/metrics`` is served without login
(as Prometheus scrapers expect); bind the API to an address only the clinic network reaches.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.core.config import Settings
from appliance.core.store import Store
from appliance.models import stats
from engines import drift

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


_HISTOGRAMS = {
    "study_score": ("appliance_model_study_score", "Study score of each analysed study"),
    "input_mean": ("appliance_model_input_mean", "Mean of each analysed image's preprocessed input in [0, 1]"),
    "input_p95": ("appliance_model_input_p95", "95th percentile of each analysed image's preprocessed input in [0, 1]"),
}
_COUNTS = {
    "count:studies": ("appliance_model_studies", "Studies analysed by the bundle version"),
    "count:images": ("appliance_model_images", "Images analysed by the bundle version"),
    "count:not_analysed": ("appliance_model_not_analysed", "Studies the bundle version applied to but did not analyse"),
}


def _histogram(name: str, doc: str, labels: list[str]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, labels=labels)


def _add_histogram(family: HistogramMetricFamily, values: list[str], bins: dict[int, tuple[int, float]]) -> None:
    """20 bins over [0, 1] -> cumulative buckets at each upper edge, +Inf, and the exact sum."""
    buckets, running = [], 0
    for i in range(drift.N_BINS):
        running += bins.get(i, (0, 0.0))[0]
        buckets.append((repr(drift.EDGES[i + 1]), running))
    buckets.append(("+Inf", running))
    family.add_metric(values, buckets, sum_value=sum(s for _, s in bins.values()))


class _BundleStatsCollector(Collector):
    """The bundle statistics (``bundle_stats``, ``bundle_drift``) at each scrape."""

    def __init__(self, store: Store):
        self.store = store

    def collect(self) -> Iterator[Metric]:
        rows = stats.totals(self.store.conn, "")
        score = _histogram(
            "appliance_model_score", "Score of each analysed image, per output label", ["bundle", "version", "label"]
        )
        others = {m: _histogram(name, doc, ["bundle", "version"]) for m, (name, doc) in _HISTOGRAMS.items()}
        counters = {
            m: CounterMetricFamily(name, doc, labels=["bundle", "version"]) for m, (name, doc) in _COUNTS.items()
        }
        positives = CounterMetricFamily(
            "appliance_model_positives", "Positive findings, per output label", labels=["bundle", "version", "label"]
        )
        refusals = CounterMetricFamily(
            "appliance_model_refusals",
            "Images or studies refused, by category",
            labels=["bundle", "version", "category"],
        )
        bins: dict[tuple[str, str, str], dict[int, tuple[int, float]]] = {}
        for r in rows:
            ident, metric, key, n = (r["bundle_id"], r["bundle_version"]), r["metric"], r["key"], int(r["n"])
            if (metric.startswith("score:") or metric in _HISTOGRAMS) and key.isdigit():
                bins.setdefault((*ident, metric), {})[int(key)] = (n, float(r["s"]))
            elif metric in _COUNTS:
                counters[metric].add_metric(list(ident), n)
            elif metric.startswith("positives:"):
                positives.add_metric([*ident, metric[10:]], n)
            elif metric == "refusals":
                refusals.add_metric([*ident, key], n)
        for (bundle, version, metric), per_bin in sorted(bins.items()):
            if metric.startswith("score:"):
                _add_histogram(score, [bundle, version, metric[6:]], per_bin)
            else:
                _add_histogram(others[metric], [bundle, version], per_bin)
        yield score
        yield from others.values()
        yield from counters.values()
        yield positives
        yield refusals
        psi = GaugeMetricFamily(
            "appliance_model_drift_psi",
            "PSI of the recent window against the bundle's reference",
            labels=["bundle", "version", "metric"],
        )
        alert = GaugeMetricFamily(
            "appliance_model_drift_alert",
            "1 when the bundle version's window drifted from its reference",
            labels=["bundle", "version"],
        )
        for name, entry in stats.drift_report(self.store.conn).items():
            bundle, _, version = name.rpartition("@")
            for metric, m in entry["metrics"].items():
                psi.add_metric([bundle, version, metric], m["psi"])
            alert.add_metric([bundle, version], int(entry["alert"]))
        yield psi
        yield alert


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
            self.registry.register(_BundleStatsCollector(store))
            self._bound = True

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format (version 0.0.4)."""
        return generate_latest(self.registry)
