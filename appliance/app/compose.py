"""The composition root: every service, pool, cache and queue of the daemon is made here and connected here.

Reading :func:`compose` gives the whole graph (as ``Application.compose()`` does in MONAI Deploy's app SDK).
No other module wires services together, creates a long-lived pool, or reaches for a module-global. The
services meet only through the small typed ports each one declares:

```
StorageSCP --on_instance(StoredInstance)--> EarlyPreparer --PreparedCache--> PipelineWorker
StudyAssembler --on_complete(study id)--> PipelineWorker.wake
PipelineWorker --on_sr_queued / on_results--> Exporter.send_now / Exporter.wake        (PACS)
PipelineWorker --ResultPublisher--> CloudResultPublisher --notify_queued--> OutboxSender   (IoT Hub)
ActiveEngines --BundleSource--> PipelineWorker, EarlyPreparer;  --on_change--> CloudAgent.report_changed
CloudAgent --method_hooks--> ControlMethods (resend, rollback_model, run_selftest), StatsService (send_stats)
PipelineWorker --on_results--> StatsService.wake;  StatsService --on_drift_change--> CloudAgent.report_changed
StatsService --notify_queued--> OutboxSender (daily final stats snapshots)
CloudAgent --desired_hook--> UpdateAgent.on_desired;  UpdateAgent --ReportedSink--> CloudAgent.report_patch
PipelineWorker --StudyGate (held per study)--> UpdateAgent (switches between studies)
PipelineWorker --on_outcome--> UpdateAgent.on_outcome (health gate);  UpdateAgent --Reload--> ActiveEngines
UpdateAgent --SelfCheck--> app.selftest.engine_selftest
CloudAgent.overlay (CloudOverlay): the twin's runtime settings, read by the publisher and the sender
CloudOverlay --check_operating_point--> models.check_operating_point (the installed manifest's threshold_range)
PipelineWorker --OperatingPoints--> CloudOverlay.current().operating_points (site thresholds, postprocess)
WebPorts.feedback_publisher --> CloudFeedbackPublisher --notify_queued--> OutboxSender    (radiologists' feedback)
PipelineWorker --on_analysed--> ApplianceMetrics.observe_analysis (inference latency histogram)
WebService <--WebPorts-- self-test, C-ECHO, status doc, SCP listening, engines, installed models, cloud status
AuditForwarder (with [audit] syslog_host): the audit trail -> the hospital's audit repository (syslog/TLS)
```

Start order is the list order; the daemon stops them in reverse, so the DICOM listener stops accepting and
drains before anything it feeds goes away, and the pools close last.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from appliance.app import readiness
from appliance.app.methods import ControlMethods
from appliance.app.selftest import engine_selftest, run_selftest
from appliance.cloud.agent import CloudAgent
from appliance.cloud.feedback_messages import CloudFeedbackPublisher
from appliance.cloud.overlay import CloudOverlay, EffectiveCloud
from appliance.cloud.result_messages import CloudResultPublisher
from appliance.cloud.stats_messages import StatsService
from appliance.core.audit_syslog import AuditForwarder
from appliance.core.config import Settings
from appliance.core.store import Store
from appliance.delivery.export import Exporter, undeliverable
from appliance.delivery.export import echo as export_echo
from appliance.ingest.assembler import StudyAssembler
from appliance.ingest.scp import StorageSCP
from appliance.ingest.spool import Spool
from appliance.models import active as models
from appliance.models import stats
from appliance.models.active import ActiveEngines
from appliance.pipeline.postprocess import OperatingPoints, SiteOperatingPoint, no_operating_points
from appliance.pipeline.prepare_early import EarlyPreparer, PreparedCache
from appliance.pipeline.results import NoPublisher, ResultPublisher
from appliance.pipeline.worker import PipelineWorker
from appliance.retention.purge import RetentionService
from appliance.updates.agent import UpdateAgent
from appliance.updates.gate import StudyGate
from appliance.updates.layout import REPORTED_KEY
from appliance.web.metrics import ApplianceMetrics
from appliance.web.ports import WebPorts, no_cloud, no_engines, with_update_states

# Threads for image preparation (decoders and numpy release the GIL) and for result building (Pillow drawing,
# numpy resampling and fsync do too): a 4-view mammogram's images and SCs overlap instead of queueing.
PREPARE_THREADS = 4
RESULT_THREADS = 4


class Service(Protocol):
    """A long-running part of the daemon. ``start`` returns once it is serving; ``stop`` once it has stopped."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Pools:
    """The daemon's shared thread pools, as a service: started first, shut down last."""

    name = "pools"

    def __init__(self) -> None:
        self.prepare = ThreadPoolExecutor(max_workers=PREPARE_THREADS, thread_name_prefix="prepare")
        self.results = ThreadPoolExecutor(max_workers=RESULT_THREADS, thread_name_prefix="results")

    def start(self) -> None:
        return None

    def stop(self) -> None:
        for pool in (self.prepare, self.results):
            pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class Appliance:
    """The composed daemon: its services in start order and where each one's status comes from."""

    services: list[Service]
    status: dict[str, Callable[[], dict[str, Any]]] = field(default_factory=dict)
    # service name -> its health check: None when healthy, else the problem in one line (the daemon's watchdog)
    health: dict[str, Callable[[], str | None]] = field(default_factory=dict)

    def status_doc(self) -> dict[str, dict[str, Any]]:
        """Service name -> its status (JSON-serialisable); services without a status report ``{}``."""
        return {s.name: self.status[s.name]() if s.name in self.status else {} for s in self.services}

    def health_problem(self) -> str | None:
        """None when every health check passes; else the first failing one's ``"<service>: <problem>"``."""
        for name, check in self.health.items():
            problem = check()
            if problem is not None:
                return f"{name}: {problem}"
        return None


def _no_update_agent(desired: Any) -> None:
    """The desired hook without an update agent: a director document is refused, not silently ignored."""
    if getattr(desired, "model_updates", None) is not None:
        raise ValueError("model_updates: this box runs no update agent (updates.enabled and pipeline.enabled)")


def site_operating_points(current: Callable[[], EffectiveCloud]) -> OperatingPoints:
    """The pipeline's :class:`OperatingPoints` port over the cloud overlay's operating points in force."""

    def for_bundle(manifest: Any) -> SiteOperatingPoint | None:
        op = current().operating_points.get(manifest.bundle_id)
        return None if op is None else SiteOperatingPoint(dict(op.thresholds), op.version, op.site)

    return for_bundle


def reported_operating_points(current: Callable[[], EffectiveCloud]) -> dict[str, Any]:
    """Reported properties ``operating_points``: bundle id -> {version, site, thresholds} in force, and
    ``operating_points_refused``: [{bundle, reason}] for each of the twin's operating points refused (the one in
    force for that bundle, if any, stays; the rest of the desired document applied), null when none (a list
    and null, so the twin's merge patch replaces or removes the old value)."""
    cur = current()
    return {
        "operating_points": {
            b: {"version": op.version, "site": op.site, "thresholds": dict(op.thresholds)}
            for b, op in sorted(cur.operating_points.items())
        },
        "operating_points_refused": [
            {"bundle": b, "reason": r} for b, r in sorted(cur.operating_points_refused.items())
        ]
        or None,
    }


def compose(settings: Settings, store: Store) -> Appliance:
    """Make and connect every service of the appliance for ``settings`` on ``store``; nothing is started."""
    pools = Pools()
    spool = Spool(settings.spool_dir)
    assembler = StudyAssembler(store, settings.dicom.quiet_seconds)
    scp = StorageSCP(settings.dicom, store, spool, assembler)
    services: list[Service] = [pools, scp, assembler]
    app = Appliance(services, {scp.name: scp.status}, {scp.name: scp.health})
    if settings.audit.syslog_host:  # the audit trail to the hospital's repository; stops after the listener
        forwarder = AuditForwarder(settings, store)
        services.insert(1, forwarder)
        app.status[forwarder.name] = forwarder.status

    metrics = ApplianceMetrics()
    agent: CloudAgent | None = None
    publisher: ResultPublisher = NoPublisher()
    cloud_publisher: CloudResultPublisher | None = None
    overlay: CloudOverlay | None = None
    feedback_publisher: CloudFeedbackPublisher | None = None
    operating_points: OperatingPoints = no_operating_points
    if settings.cloud.enabled:
        overlay = CloudOverlay(
            settings.cloud,
            store,
            check_operating_point=lambda bundle_id, thr: models.check_operating_point(settings, bundle_id, thr),
        )
        cloud_publisher = CloudResultPublisher(settings, overlay)
        feedback_publisher = CloudFeedbackPublisher(settings, overlay)
        publisher = cloud_publisher
        operating_points = site_operating_points(overlay.current)

    engines: ActiveEngines | None = None
    stats_service: StatsService | None = None
    updates: UpdateAgent | None = None
    gate = StudyGate()
    p = settings.pipeline
    if p.enabled:
        # One engine per active bundle, shared by the worker, early preparation and the cloud agent's reports;
        # the shipped reference bundles are installed on first run (engines.install_reference_bundles).
        engines = ActiveEngines(settings, install_reference=True)
        if settings.updates.enabled:
            active_engines = engines
            updates = UpdateAgent(
                settings,
                store,
                gate,
                reload=lambda: {m.bundle_id: m.version for m, _ in active_engines.active()},
                selfcheck=lambda: engine_selftest(settings),
            )
        exporter = Exporter(settings, store)
        # bundle statistics: the drift watch always, the daily snapshots to the cloud with cloud sync
        stats_engines = engines
        stats_service = StatsService(
            settings,
            store,
            manifests=lambda: [m for m, _ in stats_engines.active()],
            overlay=overlay,
        )

        def results_queued(
            wake_exporter: Callable[[], None] = exporter.wake, wake_stats: Callable[[], None] = stats_service.wake
        ) -> None:
            wake_exporter()
            wake_stats()

        cache: PreparedCache | None = None
        early: list[Service] = []
        if p.early_prepare:
            cache = PreparedCache(p.early_cache_mb * 2**20)
            preparer = EarlyPreparer(settings, engines, cache, lambda: scp.active_associations() > 0)
            scp.on_instance.append(preparer.submit)
            early.append(preparer)
            app.status[preparer.name] = preparer.status
        worker = PipelineWorker(
            settings,
            store,
            engines,
            on_results=results_queued,
            on_sr_queued=exporter.send_now,
            prepared=cache,
            publisher=publisher,
            prepare_pool=pools.prepare,
            results_pool=pools.results,
            on_analysed=metrics.observe_analysis,
            gate=gate,
            on_outcome=updates.on_outcome if updates is not None else None,
            operating_points=operating_points,
        )
        assembler.on_complete.append(lambda _study_id: worker.wake())
        services += [exporter, *early, worker, stats_service]
        app.status[stats_service.name] = stats_service.status

    if cloud_publisher is not None:
        control = ControlMethods(settings, store, cloud_publisher)
        twin_overlay = overlay
        assert twin_overlay is not None  # a cloud publisher exists only with the cloud overlay
        alert_s = settings.retention.export_alert_hours * 3600
        reported_hooks: list[Callable[[], dict[str, Any]]] = [
            lambda: {"exports_undeliverable": undeliverable(store.conn, alert_s)},  # the export alert
            lambda: reported_operating_points(twin_overlay.current),
        ]
        if engines is not None:
            reported_hooks.append(engines.describe)
            active_engines_ = engines
            reported_hooks.append(  # the drift alert: the latest evaluation of each active bundle version
                lambda: {
                    "drift": stats.drift_report(
                        store.conn, [(m.bundle_id, m.version) for m, _ in active_engines_.active()]
                    )
                }
            )
        methods = control.handlers()
        if stats_service is not None:
            methods["send_stats"] = stats_service.send_stats_method
        if updates is not None:
            reported_hooks.append(updates.reported)
        agent = CloudAgent(
            settings,
            store,
            method_hooks=methods,
            reported_hook=lambda: {k: v for hook in reported_hooks for k, v in hook().items()},
            desired_hook=updates.on_desired if updates is not None else _no_update_agent,
            overlay=overlay,
        )
        if updates is not None:
            updates.report = agent.report_patch
        cloud_publisher.on_queued = agent.sender.notify_queued
        if stats_service is not None:
            stats_service.on_queued = agent.sender.notify_queued
            stats_service.on_drift_change = agent.report_changed
        if feedback_publisher is not None:
            feedback_publisher.on_queued = agent.sender.notify_queued
        if engines is not None:
            engines.on_change.append(agent.report_changed)
        services.append(agent)
        app.status[agent.name] = agent.status
    if updates is not None:
        services.append(updates)  # after the worker and the cloud agent: its first reports reach the twin
        app.status[updates.name] = updates.status
    services.append(RetentionService(settings, store))
    if settings.api.enabled:
        # imported here: FastAPI and uvicorn take seconds to import on a loaded 2-core box, for nothing when off
        from appliance.web.server import WebService

        ports = _web_ports(settings, app, scp, engines, agent, updates)
        ports.problems = lambda: [asdict(p) for p in readiness.problems(settings, store.conn)]  # as `status`
        ports.feedback_publisher = feedback_publisher
        if agent is not None:
            current = agent.overlay.current
            ports.operating_points = lambda: reported_operating_points(current)["operating_points"]
        web = WebService(settings, store, ports, metrics)
        services.append(web)
        app.status[web.name] = web.status
    return app


def _web_ports(
    settings: Settings,
    app: Appliance,
    scp: StorageSCP,
    engines: ActiveEngines | None,
    agent: CloudAgent | None,
    updates: UpdateAgent | None,
) -> WebPorts:
    """What the dashboard may call on the running daemon (see appliance/web/ports.py)."""

    def echo_destination(name: str) -> tuple[bool, str]:
        dest = next((d for d in settings.pipeline.destinations if d.name == name), None)
        if dest is None:
            raise KeyError(name)
        return export_echo(settings, dest)

    def installed_models() -> list[dict[str, Any]]:
        """Installed versions; the over-the-air update of a bundle (state, target, reason) on the row of its
        target version, or of its active version while the target is not installed yet."""
        reg = models.registry(settings)
        rows = [
            {
                "bundle_id": b.bundle_id,
                "version": b.version,
                "state": "active" if b.active else ("previous" if b.previous else "installed"),
                "installed_at": b.installed_at,
                "key_id": b.key_id,
                "failure": b.failure,
                "update": None,
            }
            for b in reg.list()
        ]
        return with_update_states(rows, updates.reported()[REPORTED_KEY] if updates is not None else {})

    return WebPorts(
        selftest=lambda: run_selftest(settings),
        echo=echo_destination,
        status_doc=app.status_doc,
        listener_up=lambda: scp.listening,
        engines=engines.describe if engines is not None else no_engines,
        models=installed_models,
        cloud=agent.status if agent is not None else no_cloud,
        pipeline_enabled=settings.pipeline.enabled,
    )
