"""The inference worker: completed studies -> router -> engines -> results -> export queue.

- A scanner thread feeds a bounded queue with ``complete`` studies, FIFO by arrival (completion time, then
  id). The queue blocks when full; nothing is lost because the state lives in the database.
- One worker thread takes studies one at a time; each applicable bundle runs on its own engine (one engine
  per active bundle, created once), with all of the study's images in as few batches as ``max_batch``
  allows. Inference runs under a timeout: a study that times out or raises is marked ``failed`` with the
  reason and the worker moves on. Result building that raises ends that bundle with the reason (an SC that
  cannot be built is only left out: the SR still goes); a study no bundle stored results for is ``failed``.
  Any other exception sends the study back to ``complete`` for another attempt, at most
  ``pipeline.max_attempts`` (``studies.attempts``), then ``failed``: never a crash loop.
- Restart: ``appliance.pipeline.recovery`` resumes or ends every transient study first (an interrupted
  one is reprocessed with the same UIDs, so nothing is duplicated, within its attempts).
Every state change goes through ``appliance.lifecycle.studies`` (compare-and-set + event).
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset

from appliance.core.background import BackgroundLoop
from appliance.core.config import Settings
from appliance.core.logs import get_logger
from appliance.core.store import Store
from appliance.delivery.export import mark_if_exported
from appliance.ingest.records import study_instances
from appliance.lifecycle import studies
from appliance.lifecycle.studies import (
    COMPLETE,
    FAILED,
    INFERRED,
    INFERRING,
    NO_MODEL,
    NOT_ANALYSED,
    NOT_PROCESSABLE,
)
from appliance.pipeline import observe, uids
from appliance.pipeline.analyse import CachedFn, analyse_route
from appliance.pipeline.postprocess import OperatingPoints, no_operating_points
from appliance.pipeline.prepare_early import PreparedCache, cache_key
from appliance.pipeline.preprocess import NotProcessable, Prepared
from appliance.pipeline.recovery import recover
from appliance.pipeline.results import ResultPublisher, save_notices, save_results
from appliance.pipeline.router import InferenceEngine, Route, explain, gated, not_applied_detail, refusal_detail, route
from engines.manifest import Manifest

log = get_logger(__name__)


class BundleSource(Protocol):
    """The active bundles, each with its loaded engine (``infer`` + ``max_batch``); ``close`` releases them."""

    def active(self) -> Sequence[tuple[Manifest, InferenceEngine]]: ...

    def close(self) -> None: ...


class AnalysisObserver(Protocol):
    """Told, after each bundle analysed a study, its timings in seconds (``preprocess``, ``inference``,
    ``postprocess``, ``load``; see ``analyse.Analysis.timings``): the daemon's metrics histogram. Must be quick."""

    def __call__(self, bundle_id: str, version: str, timings: Mapping[str, float]) -> None: ...


class StudyGuard(Protocol):
    """Held around each study (the update agent's gate): a model switch waits for the study to finish."""

    def study(self) -> AbstractContextManager[None]: ...


EngineOutcome = Callable[[str, str, str | None], None]
"""(bundle id, version, engine error or None): one bundle analysed one real study (the health gate counts them)."""


class StaticBundles:
    """A fixed list of (manifest, engine): tests and ``appliance infer``. Closing it closes nothing: the
    caller owns the engines."""

    def __init__(self, bundles: Sequence[tuple[Manifest, InferenceEngine]]):
        self.bundles = list(bundles)

    def active(self) -> Sequence[tuple[Manifest, InferenceEngine]]:
        return list(self.bundles)

    def close(self) -> None:
        return None


DEFER_BYTES = 64 * 1024  # values this large stay on disk until accessed (spool files never change)


def load_instances(store: Store, study_id: int, spool_dir: Path) -> tuple[list[Dataset], list[str], list[str]]:
    """The whole study as of this revision (newest copy of each image: series + SOP UID), in arrival order: the
    datasets, their sha256 (same order) and the problems.

    Unreadable files are reported, not fatal. A later revision (late instance) is therefore analysed
    with all of the study's images; per-image SC UIDs stay the same, the SR gets a new UID.
    Large values (the pixel data) are read from the spool file only when used: with the model inputs
    prepared while the study arrived, the SR needs the headers alone (a 4-view mammogram is 44 MB).
    """
    datasets: list[Dataset] = []
    shas: list[str] = []
    problems: list[str] = []
    for inst in study_instances(store, spool_dir, study_id, cumulative=True):
        try:
            datasets.append(dcmread(inst.path, defer_size=DEFER_BYTES))
            shas.append(inst.sha256)
        except Exception as exc:  # corrupt or missing spool file
            problems.append(f"{inst.sop_instance_uid}: unreadable ({exc})")
    return datasets, shas, problems


def uid_conflict_notes(study_id: int, images: list[Dataset]) -> list[str]:
    """One line per SOP Instance UID that images of different series share (PS3.3 C.12.1.1.1 says it cannot
    happen; modalities re-using UIDs make it happen): each image is analysed and gets its own results
    (``records.study_instances`` keeps one copy per series and SOP UID, ``uids.image_key``). Logged as a
    warning with counts only (no patient data)."""
    pairs = [(str(ds.get("SeriesInstanceUID", "") or ""), str(ds.SOPInstanceUID)) for ds in images]
    conflicts = uids.shared_sop_uids(pairs)
    if conflicts:
        log.warning(
            "images of different series share a SOP Instance UID; each analysed with its own results",
            study_id=study_id,
            sop_uids=len(conflicts),
            images=sum(len(c["series_uids"]) for c in conflicts),
        )
    return [
        f"SOP Instance UID {c['sop_instance_uid']} shared by {len(c['series_uids'])} images in different series,"
        " each analysed"
        for c in conflicts
    ]


class PipelineWorker:
    """The pipeline Service (``name``, ``start()``, ``stop()``)."""

    name = "pipeline"

    def __init__(
        self,
        settings: Settings,
        store: Store,
        bundles: BundleSource,
        on_results: Callable[[], None] | None = None,
        on_sr_queued: Callable[[], object] | None = None,
        prepared: PreparedCache | None = None,
        publisher: ResultPublisher | None = None,
        prepare_pool: Executor | None = None,
        results_pool: Executor | None = None,
        on_analysed: AnalysisObserver | None = None,
        gate: StudyGuard | None = None,
        on_outcome: EngineOutcome | None = None,
        operating_points: OperatingPoints = no_operating_points,
    ):
        """``on_results``: results queued for export (the exporter's ``wake``); ``on_sr_queued``: one study's SR
        queued, its SCs not yet built (the exporter's ``send_now``); ``prepared``: images prepared while they
        arrived; ``publisher``: where results go besides the PACS (the cloud outbox); ``prepare_pool`` and
        ``results_pool``: the composition root's pools for image preparation and result building (None: on the
        worker's thread); ``on_analysed``: told each bundle's timings on each study (the daemon's metrics);
        ``gate``: held for each whole study so a model switch happens between studies; ``on_outcome``: told each
        bundle's engine outcome per study; ``operating_points``: the site operating point in force for a bundle
        (the cloud overlay's, wired by the composition root), read once per study and bundle. The worker owns only
        its inference thread."""
        self.settings = settings
        self.store = store
        self.bundles = bundles
        self.on_results = on_results  # results queued for export (the exporter's wake)
        self.on_sr_queued = on_sr_queued or on_results  # a study's SR queued, SCs not yet built
        self.prepared = prepared  # images prepared as they arrived (prepare_early), keyed by sha256 + bundle
        self.publisher = publisher
        self.prepare_pool = prepare_pool
        self.results_pool = results_pool
        self.on_analysed = on_analysed
        self.gate = gate
        self.on_outcome = on_outcome
        self.operating_points = operating_points
        self.queue: queue.Queue[int] = queue.Queue(maxsize=settings.pipeline.queue_size)
        self._queued: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._scanner = BackgroundLoop("pipeline-scan", self._scan_pass, settings.pipeline.poll_s)
        self._threads: list[threading.Thread] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infer")
        self.last_timings: dict[str, float] = {}

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        self.resume()
        self._stop.clear()
        self._scanner.start()
        t = threading.Thread(target=self._work_loop, name="pipeline-work", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self._scanner.stop()
        for t in self._threads:
            t.join(timeout=10)
        self._threads = []
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.bundles.close()

    def wake(self) -> None:
        """A study just completed: look now instead of at the next poll."""
        self._scanner.wake()

    def resume(self) -> int:
        """Startup recovery (``lifecycle.recovery.recover``); returns how many studies were ``inferring``."""
        return recover(self.settings, self.store).interrupted

    # -- scanning --------------------------------------------------------------------------------------
    def scan_once(self) -> int:
        rows = self.store.query(
            "SELECT id FROM studies WHERE state=? ORDER BY COALESCE(completed_at, updated_at), id", (COMPLETE,)
        )
        added = 0
        for r in rows:
            with self._lock:
                if r["id"] in self._queued:
                    continue
                self._queued.add(r["id"])
            while not self._stop.is_set():
                try:
                    self.queue.put(r["id"], timeout=0.5)
                    added += 1
                    break
                except queue.Full:
                    continue
        return added

    def _scan_pass(self) -> None:
        self.scan_once()

    def _work_loop(self) -> None:
        try:  # warm up before the first study: install reference bundles, load (compile) every engine
            names = [f"{m.bundle_id}@{m.version}" for m, _ in self.bundles.active()]
            log.info("pipeline ready", bundles=names)
        except Exception:
            log.exception("loading the active bundles failed; retrying per study")
        while not self._stop.is_set():
            try:
                study_id = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                if self.gate is not None:
                    with self.gate.study():
                        self.process(study_id)
                else:
                    self.process(study_id)
            except Exception as exc:
                log.exception("pipeline crashed on study", study_id=study_id)
                self._after_crash(study_id, f"{type(exc).__name__}: {exc}")
            finally:
                with self._lock:
                    self._queued.discard(study_id)

    # -- one study -------------------------------------------------------------------------------------
    def cached_lookup(
        self, manifest: Manifest, images: list[Dataset], shas: list[str], hits: list[int]
    ) -> CachedFn | None:
        """Look an image up in the early-preparation cache by its sha256 and the bundle's id and version."""
        cache = self.prepared
        if cache is None:
            return None
        sha_of = {id(ds): sha for ds, sha in zip(images, shas, strict=True)}
        wait_s = self.settings.pipeline.early_wait_s

        def lookup(ds: Dataset) -> Prepared | None:
            sha = sha_of.get(id(ds))
            hit = cache.get(cache_key(sha, manifest), wait_s) if sha else None
            if hit is not None:
                hits.append(1)
            return hit

        return lookup

    def _outcome(self, manifest: Manifest, error: str | None) -> None:
        """Tell ``on_outcome`` how this bundle's engine did on the study (never fails the study)."""
        if self.on_outcome is None:
            return
        try:
            self.on_outcome(manifest.bundle_id, manifest.version, error)
        except Exception:
            log.exception("engine outcome hook failed", bundle=manifest.bundle_id)

    def _set(
        self, study_id: int, state: str, detail: str | None, record: Callable[[sqlite3.Connection], None] | None = None
    ) -> None:
        """``inferring`` -> ``state`` (compare-and-set, with its event); ``record`` counts the study in the bundle
        statistics in the same transaction (``appliance.pipeline.observe``)."""
        with self.store.transaction() as conn:
            studies.transition(conn, study_id, INFERRING, state, detail)
            if record is not None:
                record(conn)

    def _after_crash(self, study_id: int, reason: str) -> None:
        """``process`` raised: an ``inferring`` study gets another attempt or ends ``failed`` (bounded)."""
        try:
            with self.store.transaction() as conn:
                st = studies.get(conn, study_id)
                if st is not None and st.state == INFERRING:
                    state = studies.retry_or_fail(
                        conn, study_id, f"pipeline error: {reason}", self.settings.pipeline.max_attempts
                    )
                    log.warning("study after pipeline error", study_id=study_id, state=state)
        except Exception:
            log.exception("could not record the pipeline error", study_id=study_id)

    def _not_analysed(self, study_id: int, routes: list[Route], notes: list[str]) -> str:
        """Every image of the bundles' modality refused by their gate: the "AI not applied" notices go to the PACS
        (``results.save_notices``), the study ends ``not_analysed`` with one reason per image."""
        problems = save_notices(self.settings, self.store, study_id, routes, self.results_pool)
        detail = "AI not applied: " + not_applied_detail(routes) + "".join(f"; {n}" for n in [*problems, *notes])
        self._set(study_id, NOT_ANALYSED, detail, lambda conn: observe.record_gated(conn, routes, whole=True))
        log.info(
            "study not analysed: input gate refused every image",
            study_id=study_id,
            categories=sorted({why.category for r in routes for _, why in r.refused}),
        )
        if self.on_results is not None:
            self.on_results()
        return NOT_ANALYSED

    def process(self, study_id: int) -> str:
        """Run every applicable bundle on one study; returns the state it ends in."""
        row = self.store.query("SELECT state, study_uid, calling_ae FROM studies WHERE id=?", (study_id,))
        if not row or row[0]["state"] != COMPLETE:
            return row[0]["state"] if row else "missing"
        study_uid, calling_ae = row[0]["study_uid"], row[0]["calling_ae"]
        try:
            with self.store.transaction() as conn:
                go = studies.begin_inference(conn, study_id, self.settings.pipeline.max_attempts)
        except studies.LostRace as exc:  # moved on meanwhile
            return exc.actual or "missing"
        if not go:
            log.error("study failed: attempts used up", study_id=study_id)
            return FAILED
        t0 = time.perf_counter()
        images, shas, problems = load_instances(self.store, study_id, self.settings.spool_dir)
        if not images:
            detail = "; ".join(problems) or "no instances recorded for the study"
            self._set(study_id, NOT_PROCESSABLE, detail)
            log.warning("study not processable", study_id=study_id, study_uid=study_uid, reason=detail)
            return NOT_PROCESSABLE
        notes = uid_conflict_notes(study_id, images)
        active = self.bundles.active()
        routes = route(active, images, self.settings.pipeline.routes, calling_ae)
        refused_whole = gated(active, images, self.settings.pipeline.routes, calling_ae)
        if refused_whole and not routes:
            return self._not_analysed(study_id, refused_whole, notes)
        if not routes:
            detail = explain(active, images, self.settings.pipeline.routes, calling_ae)
            detail += "".join(f"; {n}" for n in notes)
            refused = [(m, why.category) for m, _ in active for ds in images if (why := refusal_detail(m, ds))]
            self._set(study_id, NO_MODEL, detail, lambda conn: observe.record_no_model(conn, refused))
            # the detail (kept in the database) may state a patient's age: the log names the categories only
            log.info("no model for study", study_id=study_id, categories=sorted({c for _, c in refused}))
            return NO_MODEL
        p = self.settings.pipeline
        loaded = time.perf_counter() - t0  # spool files read and routed
        reasons: list[str] = list(problems)  # images or bundles skipped (not processable)
        failures: list[str] = []  # bundles whose results could not be built
        left_out: list[str] = []  # objects missing from stored results (e.g. an SC that could not be built)
        stored = 0
        unanalysed: list[tuple[Manifest, list[str]]] = []  # bundles that took none of the images, with the reasons

        def record(conn: sqlite3.Connection) -> None:
            observe.record_gated(conn, [r for r in routes if r.refused], whole=False)
            for manifest, why in unanalysed:
                observe.record_unanalysed(conn, manifest, why)

        for r in routes:
            name = f"{r.manifest.bundle_id} {r.manifest.version}"
            hits: list[int] = []
            fut = self._pool.submit(
                analyse_route,
                r,
                p,
                self.cached_lookup(r.manifest, images, shas, hits),
                self.prepare_pool,
                self.operating_points(r.manifest),
            )
            try:
                analysis = fut.result(timeout=p.inference_timeout_s)
            except FutureTimeout:
                # the stuck call keeps its thread; a fresh pool lets the next study run
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infer")
                reason = f"{name}: inference timed out after {p.inference_timeout_s:g} s"
                self._outcome(r.manifest, reason)
                self._set(study_id, FAILED, reason)
                log.error("inference timed out", study_id=study_id, study_uid=study_uid, bundle=r.manifest.bundle_id)
                return FAILED
            except NotProcessable as exc:
                reasons.append(f"{r.manifest.bundle_id}: {exc.reason}")
                unanalysed.append((r.manifest, [why for _, why in exc.skipped] or [exc.reason]))
                continue
            except Exception as exc:
                reason = f"{r.manifest.bundle_id} {r.manifest.version}: {type(exc).__name__}: {exc}"
                self._outcome(r.manifest, reason)
                self._set(study_id, FAILED, reason)
                log.exception("inference failed", study_id=study_id, study_uid=study_uid, bundle=r.manifest.bundle_id)
                return FAILED
            analysis.timings["load"] = loaded
            if self.on_analysed is not None:
                try:
                    self.on_analysed(r.manifest.bundle_id, r.manifest.version, analysis.timings)
                except Exception:  # an observer never fails a study
                    log.exception("analysis observer failed", bundle=r.manifest.bundle_id)
            analysis.timings["early_prepared"] = float(len(hits))  # images taken from the cache (a count)
            try:
                saved = save_results(
                    self.settings,
                    self.store,
                    study_id,
                    analysis,
                    r.manifest,
                    on_queued=self.on_sr_queued,
                    publisher=self.publisher,
                    pool=self.results_pool,
                )
            except Exception as exc:  # a result builder or a file write raised: this bundle has no results
                failures.append(f"{name}: results not built: {type(exc).__name__}: {exc}")
                log.exception("results not built", study_id=study_id, bundle=r.manifest.bundle_id)
                continue
            self._outcome(r.manifest, None)
            left_out += [f"{name}: {what}" for what in saved.problems]
            self.last_timings = {**analysis.timings, "total": time.perf_counter() - t0}
            stored += 1
        if stored == 0 and failures:
            self._set(study_id, FAILED, "; ".join(failures + reasons + notes))
            log.error("study failed: no results built", study_id=study_id, bundles=len(failures))
            return FAILED
        if stored == 0:
            self._set(study_id, NOT_PROCESSABLE, "; ".join(reasons + notes), record)
            log.warning("study not processable", study_id=study_id, study_uid=study_uid, reason="; ".join(reasons))
            return NOT_PROCESSABLE
        not_applied = [r for r in routes if r.refused] + refused_whole  # another bundle may have refused them all
        detail = f"{stored} bundle(s)" + "".join(
            f"; {what}: {'; '.join(items)}"
            for what, items in (
                ("failed", failures),
                ("left out", left_out),
                ("skipped", reasons),
                ("AI not applied", [not_applied_detail(not_applied)] if not_applied else []),
                ("SOP UID conflict", notes),
            )
            if items
        )
        with self.store.transaction() as conn:
            studies.transition(conn, study_id, INFERRING, INFERRED, detail)
            record(conn)
            mark_if_exported(conn, study_id)  # a fast exporter may already be done
        if self.on_results is not None:
            self.on_results()
        return INFERRED
