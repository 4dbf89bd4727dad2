"""The update agent: the daemon service that reconciles this box's models to the twin's director.

Per bundle id the director names (``desired.model_updates``), one update walks the state machine of
:class:`appliance.updates.layout.UpdateState`::

    waiting_window -> downloading -> verifying -> compiling -> validating -> activating -> health_gate -> active
                                                                            failed(reason) | rolled_back(reason)

* downloading: TUF refresh (:mod:`appliance.updates.tuf_client`), target info, the disk budget (target length +
  ``updates.compile_headroom_bytes`` against free space) checked BEFORE any byte is fetched, then the target
  into ``<state_dir>/updates/partial/`` resuming with HTTP Range (:mod:`appliance.updates.fetch`).
* verifying: TUF length + hashes; the bundle is the named id and version, for the task the box runs, not below
  the highest version ever installed (:mod:`appliance.updates.state`); then ``engines.registry`` installs it
  (Ed25519 signature, manifest hashes, revoked keys: defence in depth).
* compiling / validating: ``engines.runtime.compile_engine`` for this hardware, then the golden check of the
  compiled engine. A version that fails it is recorded as failed in the registry and never activated.
* activating: under the :class:`~appliance.updates.gate.StudyGate` (between studies), the registry's active
  version is swapped and the pipeline's engines reloaded.
* health_gate: the engine self-test (a port), then ``health_studies`` real studies without an engine error
  before ``health_deadline_s``; otherwise the previous version is activated again (rolled_back, with the reason).

Each step is persisted before it runs; at start every unfinished update resumes at its step (a download at the
bytes already on disk; an activation whose registry swap already happened goes on to the health gate), so after
a SIGKILL exactly one version is active (the registry's atomic state file) and the update finishes or fails.
A newer desired version supersedes a running update at its next step or chunk: the last patch wins. A download
pauses at its next chunk (resuming later with Range) when another bundle on probation has to be rolled back.
"""

from __future__ import annotations

import datetime as dt
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from appliance.core.config import Settings
from appliance.core.logs import get_logger
from appliance.core.store import Store
from appliance.models import active as models
from appliance.updates.director import Policy, parse_director
from appliance.updates.fetch import DownloadFailed, HttpFetcher
from appliance.updates.gate import StudyGate, SwitchTimeout
from appliance.updates.layout import REPORTED_KEY, UpdateState
from appliance.updates.state import Superseded, UpdateRow, UpdateStore
from appliance.updates.tuf_client import RepositoryRefused, RepositoryUnreachable, TufClient
from engines import runtime
from engines.bundle import read_manifest_unverified
from engines.errors import EnginesError
from engines.manifest import version_key
from engines.registry import Registry

log = get_logger(__name__)

ReportedSink = Callable[[dict[str, Any]], None]
"""Sends one reported-properties patch (``{"model_updates": {bundle_id: {...}}}``) to the twin."""
Reload = Callable[[], Mapping[str, str]]
"""Reloads the pipeline's engines from the registry; returns bundle id -> the version now loaded."""
SelfCheck = Callable[[], tuple[bool, str]]
"""The engine self-test (every active bundle's golden check and the phantom chain): (passed, detail)."""

S = UpdateState
_REPORT_EVERY_S = 0.5


class _Failed(Exception):
    """The update of one bundle ends ``failed`` with this reason (the old version keeps serving)."""


def _iso(ts: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else None


class UpdateAgent:
    """Daemon ``Service`` (``name``, ``start()``, ``stop()``) reconciling models to the director.

    Ports (given by :func:`appliance.app.compose.compose`): ``gate`` (held by the pipeline worker per study),
    ``report`` (reported-property patches to the twin), ``reload`` (the pipeline's engines after a swap) and
    ``selfcheck`` (the engine self-test of the health gate). ``on_desired`` is the cloud agent's desired hook
    and ``on_outcome`` the pipeline worker's engine-outcome hook.
    """

    name = "updates"

    def __init__(
        self,
        settings: Settings,
        store: Store,
        gate: StudyGate,
        *,
        report: ReportedSink | None = None,
        reload: Reload | None = None,
        selfcheck: SelfCheck | None = None,
        local_now: Callable[[], dt.datetime] = dt.datetime.now,
    ):
        self.settings = settings
        self.rows = UpdateStore(store)
        self.gate = gate
        self.report = report
        self.reload = reload
        self.selfcheck = selfcheck
        self.local_now = local_now
        u = settings.updates
        self.poll_s = u.poll_s
        self.fetcher = HttpFetcher(u.ca_file, u.timeout_s)
        self.tuf = TufClient(settings, self.fetcher)
        self.partial_dir = settings.state_dir / "updates" / "partial"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._retry_at: dict[str, float] = {}
        self._last_report: dict[str, float] = {}
        self._compile_progress: dict[str, dict[str, Any]] = {}  # bundle id -> {"phase", "done", "total"}
        # a state change and its report happen together: the twin sees the states in the order they were stored
        self._lock = threading.RLock()

    # ---------------------------------------------------------------- Service
    def start(self) -> None:
        """Resume every unfinished update (in its persisted step) on the agent's thread."""
        self._stop.clear()
        rows = self.rows.all()
        keep = {f"{r.bundle_id}-{r.target}." for r in rows if r.state in (S.DOWNLOADING, S.VERIFYING)}
        for part in self.partial_dir.glob("*.part"):  # of an update superseded or ended while we were down
            if not any(part.name.startswith(k) for k in keep):
                part.unlink(missing_ok=True)
        for row in rows:
            if not row.terminal:
                log.info("update resumed after restart", bundle=row.bundle_id, version=row.target, state=str(row.state))
            self._send(row)
        self._thread = threading.Thread(target=self._run, name="update-agent", daemon=True)
        self._thread.start()
        log.info("update agent started", repository=self.settings.updates.repository_url)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
        log.info("update agent stopped")

    def status(self) -> dict[str, Any]:
        """Every update's state (for the daemon's status file) and the study gate."""
        return {"updates": {r.bundle_id: self._doc(r) for r in self.rows.all()}, "gate": self.gate.status()}

    # ---------------------------------------------------------------- ports in
    def on_desired(self, desired: Any) -> None:
        """The twin's desired document was validated (the cloud agent's hook): take its ``model_updates``.

        Raises ValueError (the twin then rejects the whole document and reports why) when ``model_updates`` is
        not a valid director document. Idempotent: the same target again changes nothing.
        """
        doc = getattr(desired, "model_updates", None)
        if doc is None:
            return
        director = parse_director(doc)
        policy = director.policy.model_dump()
        changed = False
        with self._lock:
            for bundle_id, target in director.bundles.items():
                row = self.rows.get(bundle_id)
                if row is not None and row.target == target.version:
                    if row.policy != policy:
                        self.rows.set_policy(bundle_id, policy)
                    continue
                active = self._registry().active_version(bundle_id)
                if active == target.version:  # already running it (or halting a rollout): nothing to fetch
                    row = self.rows.target(bundle_id, target.version, policy, S.ACTIVE)
                else:
                    row = self.rows.target(bundle_id, target.version, policy, S.WAITING_WINDOW)
                    log.info("model update requested", bundle=bundle_id, version=target.version, active=active)
                self._retry_at.pop(bundle_id, None)  # a new target does not wait out the old one's backoff
                self._send(row, force=True)
                changed = True
        if changed:
            self._wake.set()

    def on_outcome(self, bundle_id: str, version: str, error: str | None) -> None:
        """One real study analysed by ``bundle_id`` ``version`` (the pipeline worker's hook): counted by the
        health gate while that version is on probation; an engine error ends the probation (rollback)."""
        row = self.rows.get(bundle_id)
        if row is None or row.state != S.HEALTH_GATE or row.target != version:
            return
        if error is not None:
            try:
                self.rows.move(row, S.HEALTH_GATE, reason=f"engine error on a real study: {error}"[:1000])
            except Superseded:
                return
        else:
            self.rows.count_healthy(bundle_id, version)
        self._wake.set()

    def reported(self) -> dict[str, Any]:
        """The whole reported section: bundle id -> state document (layout's ``reported.model_updates``)."""
        return {REPORTED_KEY: {r.bundle_id: self._doc(r) for r in self.rows.all()}}

    # ---------------------------------------------------------------- reporting
    def _registry(self) -> Registry:
        return models.registry(self.settings)

    def _doc(self, row: UpdateRow) -> dict[str, Any]:
        try:
            active = self._registry().active_version(row.bundle_id)
        except EnginesError:
            active = None
        doc: dict[str, Any] = {
            "state": str(row.state),
            "version": row.target,
            "active_version": active,
            "bytes": row.bytes,
            "total": row.total,
            "reason": row.reason,
            "since": _iso(row.since),
        }
        progress = self._compile_progress.get(row.bundle_id)
        if progress is not None and row.state == S.COMPILING:
            doc["progress"] = progress  # the backend's build phase (e.g. TensorRT's layers), while compiling
        return doc

    def _send(self, row: UpdateRow, force: bool = True) -> None:
        now = time.monotonic()
        if not force and now - self._last_report.get(row.bundle_id, 0.0) < _REPORT_EVERY_S:
            return
        self._last_report[row.bundle_id] = now
        if self.report is not None:
            try:
                self.report({REPORTED_KEY: {row.bundle_id: self._doc(row)}})
            except Exception:
                log.exception("update state could not be reported", bundle=row.bundle_id)

    def _move(self, row: UpdateRow, state: UpdateState, reason: str | None = None, **fields: Any) -> UpdateRow:
        with self._lock:
            new = self.rows.move(row, state, reason=reason, **fields)
            self._send(new)
        log.info(
            "model update step",
            bundle=row.bundle_id,
            version=row.target,
            state=str(state),
            reason=reason,
        )
        return new

    # ---------------------------------------------------------------- the worker
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            for row in self.rows.all():
                if self._stop.is_set():
                    break
                if row.terminal or time.monotonic() < self._retry_at.get(row.bundle_id, 0.0):
                    continue
                try:
                    self._advance(row)
                except Superseded as exc:
                    log.info("model update superseded", bundle=exc.bundle_id, version=exc.target)
                    for part in self.partial_dir.glob(f"{exc.bundle_id}-{exc.target}.*"):
                        part.unlink(missing_ok=True)
                    self._wake.set()
                except Exception as exc:  # a bug must not kill the agent; the update ends failed, visibly
                    log.exception("model update crashed", bundle=row.bundle_id, version=row.target)
                    self._fail(row, f"internal error: {type(exc).__name__}: {exc}")
            self._wake.wait(self.poll_s)

    def _fail(self, row: UpdateRow, reason: str) -> None:
        try:
            self._move(row, S.FAILED, reason=reason[:1000])
        except Superseded:
            return
        for part in self.partial_dir.glob(f"{row.bundle_id}-{row.target}.*"):
            part.unlink(missing_ok=True)

    def _advance(self, row: UpdateRow) -> None:
        """Run ``row``'s update from its persisted step until it ends or has to wait."""
        policy = Policy.model_validate(row.policy)
        try:
            if row.state == S.WAITING_WINDOW:
                if not policy.in_window(self.local_now()):
                    return
                row = self._move(row, S.DOWNLOADING)
            if row.state == S.DOWNLOADING:
                row = self._download(row)
            if row.state == S.VERIFYING:
                row = self._verify(row)
            if row.state == S.COMPILING:
                row = self._compile(row)
            if row.state == S.VALIDATING:
                row = self._validate(row)
            if row.state == S.ACTIVATING:
                row = self._activate(row, policy)
            if row.state == S.HEALTH_GATE:
                self._health(row, policy)
        except _Failed as exc:
            self._fail(row, str(exc))
        except _Wait:
            return

    # -- steps ---------------------------------------------------------------------------------------
    def _part(self, row: UpdateRow, sha256: str) -> Path:
        return self.partial_dir / f"{row.bundle_id}-{row.target}.{sha256[:16]}.part"

    def _target(self, row: UpdateRow) -> Any:
        """TUF refresh + the target's signed info; _Failed when refused or absent, _Wait when unreachable."""
        try:
            updater = self.tuf.refresh()
            info = self.tuf.targetinfo(updater, row.bundle_id, row.target)
        except RepositoryRefused as exc:
            raise _Failed(str(exc)) from exc
        except RepositoryUnreachable as exc:
            self._later(row, str(exc))
            raise _Wait() from exc
        if info is None:
            raise _Failed(f"{row.bundle_id} {row.target} is not in the update repository [unknown_version]")
        try:
            url = self.tuf.target_url(info)
        except RepositoryRefused as exc:
            raise _Failed(str(exc)) from exc
        return info, url

    def _rollback_due(self, downloading: str) -> bool:
        """True when a bundle other than ``downloading`` is on probation and has to be rolled back now (an
        engine error, a failed self-test, or its deadline passed): a download, however slow its link, pauses
        for it (one worker thread runs every update, so a trickling repository must not keep a failing model
        serving)."""
        t = time.time()
        mono = time.monotonic()
        return any(
            r.state == S.HEALTH_GATE
            and r.bundle_id != downloading
            and mono >= self._retry_at.get(r.bundle_id, 0.0)
            and (r.reason is not None or (r.health_deadline is not None and t >= r.health_deadline))
            for r in self.rows.all()
        )

    def _later(self, row: UpdateRow, why: str) -> None:
        """Try ``row`` again after ``updates.retry_s``; while fetching, the reason is reported (state unchanged)."""
        delay = self.settings.updates.retry_s
        self._retry_at[row.bundle_id] = time.monotonic() + delay
        log.warning("model update waits", bundle=row.bundle_id, state=str(row.state), retry_in_s=delay, reason=why)
        reason = f"waiting to retry: {why}"[:1000]
        if row.state in (S.DOWNLOADING, S.VERIFYING) and row.reason != reason:
            self._move(row, row.state, reason=reason)

    def _check_custom(self, row: UpdateRow, info: Any) -> None:
        """The target's signed ``custom`` fields (bundle id, version, task; written by ``appliance central repo
        publish``) must name this update and the task this bundle id runs here: refused before any byte."""
        custom = info.unrecognized_fields.get("custom")
        if not isinstance(custom, dict):
            return
        named = (custom.get("bundle_id", row.bundle_id), custom.get("version", row.target))
        if named != (row.bundle_id, row.target):
            raise _Failed(f"the repository signs this target as {named[0]} {named[1]} [wrong_bundle]")
        reg = self._registry()
        active = reg.active_version(row.bundle_id)
        if active is not None and "task" in custom:
            task = reg.manifest(row.bundle_id, active).task
            if custom["task"] != task:
                raise _Failed(f"bundle is for task {custom['task']!r}; {row.bundle_id} runs {task!r} here [wrong_task]")

    def _download(self, row: UpdateRow) -> UpdateRow:
        info, url = self._target(row)
        self._check_custom(row, info)
        part = self._part(row, info.hashes["sha256"])
        have = part.stat().st_size if part.exists() else 0
        free = shutil.disk_usage(self.settings.state_dir).free
        need = max(0, info.length - have) + self.settings.updates.compile_headroom_bytes
        if need > free:
            raise _Failed(
                f"disk budget: the update needs {need} bytes ({info.length} bundle + headroom), {free} free [disk_full]"
            )
        row = self._move(row, S.DOWNLOADING, bytes=have, total=info.length)

        def progress(done: int) -> None:
            if self._stop.is_set() or self._rollback_due(row.bundle_id):
                raise _Wait()  # the partial file stays: the next pass resumes it with Range
            with self._lock:
                self.rows.progress(row, done, info.length)
                cur = self.rows.get(row.bundle_id)
                if cur is None or cur.target != row.target:
                    raise Superseded(row.bundle_id, row.target)
                self._send(cur, force=done >= info.length)

        u = self.settings.updates
        try:
            self.fetcher.download_resumable(url, part, info.length, attempts=u.download_attempts, progress=progress)
        except DownloadFailed as exc:
            if exc.reason == "connection":
                self._later(row, str(exc))
                raise _Wait() from exc
            raise _Failed(f"download of {info.path} refused: {exc}") from exc
        return self._move(row, S.VERIFYING, bytes=info.length, total=info.length)

    def _verify(self, row: UpdateRow) -> UpdateRow:
        info, _url = self._target(row)
        part = self._part(row, info.hashes["sha256"])
        if not part.exists():  # e.g. removed by hand: fetch again
            return self._move(row, S.DOWNLOADING, bytes=0)
        try:
            self.tuf.verify(info, part)
        except RepositoryRefused as exc:
            part.unlink(missing_ok=True)
            raise _Failed(str(exc)) from exc
        reg = self._registry()
        try:
            m = read_manifest_unverified(part)
        except EnginesError as exc:
            raise _Failed(f"not a bundle: {exc}") from exc
        if (m.bundle_id, m.version) != (row.bundle_id, row.target):
            raise _Failed(
                f"the target holds {m.bundle_id} {m.version}, not {row.bundle_id} {row.target} [wrong_bundle]"
            )
        active = reg.active_version(row.bundle_id)
        if active is not None:
            task = reg.manifest(row.bundle_id, active).task
            if m.task != task:
                raise _Failed(f"bundle is for task {m.task!r}; {row.bundle_id} runs {task!r} here [wrong_task]")
        floor = self.rows.highest(row.bundle_id)
        installed = list(reg.state(row.bundle_id)["installed"])
        for v in [*installed, *([floor] if floor else [])]:
            if version_key(row.target) < version_key(v):
                raise _Failed(f"{row.target} is below {v}, the highest version ever installed here [downgrade]")
        try:
            verified = reg.install(part, appliance_version=runtime_options(self.settings).appliance_version)
        except EnginesError as exc:
            raise _Failed(f"bundle refused: {exc}") from exc
        signed = (info.unrecognized_fields.get("custom") or {}).get("manifest_sha256")
        if signed is not None and signed != verified.digest:  # TUF and the bundle signature name other content
            reg.record_failure(row.bundle_id, row.target, "manifest_mismatch", "TUF custom.manifest_sha256 differs")
            raise _Failed("the bundle's manifest is not the one the repository signed [manifest_mismatch]")
        self.rows.record_installed(row.bundle_id, row.target)
        part.unlink(missing_ok=True)
        return self._move(row, S.COMPILING, bytes=info.length, total=info.length)

    def _compile_once(self, row: UpdateRow) -> Any:
        def progress(phase: str, done: int, total: int) -> None:
            log.info("compiling", bundle=row.bundle_id, version=row.target, phase=phase, done=done, total=total)
            self._compile_progress[row.bundle_id] = {"phase": phase, "done": done, "total": total}
            if row.state == S.COMPILING:
                with self._lock:
                    self._send(row, force=done >= total)

        reg = self._registry()
        try:
            return runtime.compile_engine(
                self.settings.models_dir,
                row.bundle_id,
                runtime_options(self.settings),
                version=row.target,
                trust=reg.trust,
                progress=progress,
            )
        except EnginesError as exc:
            raise _Failed(f"engine for this hardware refused: {exc}") from exc

    def _compile(self, row: UpdateRow) -> UpdateRow:
        """Build (or take from the engine cache) the engine for this hardware; compile_engine golden-checks it
        as it builds, and a mismatch fails here already (recorded in the registry: never activated)."""
        try:
            self._compile_once(row).engine.close()
        finally:
            self._compile_progress.pop(row.bundle_id, None)
        return self._move(row, S.VALIDATING)

    def _validate(self, row: UpdateRow) -> UpdateRow:
        """The golden check of the compiled engine, loaded the way the pipeline will load it."""
        result = self._compile_once(row)
        result.engine.close()
        if not result.golden.passed:  # compile_engine raises on a mismatch; this guards a change there
            raise _Failed(f"golden check failed: {result.golden.summary()} [golden_mismatch]")
        reg = self._registry()
        return self._move(row, S.ACTIVATING, from_version=reg.active_version(row.bundle_id))

    def _switch(self) -> Any:
        return self.gate.switch(timeout_s=2 * self.settings.pipeline.inference_timeout_s + 60)

    def _activate(self, row: UpdateRow, policy: Policy) -> UpdateRow:
        reg = self._registry()
        try:
            with self._switch():
                if reg.active_version(row.bundle_id) != row.target:
                    try:
                        reg.activate(row.bundle_id, row.target)
                    except EnginesError as exc:
                        raise _Failed(f"activation refused: {exc}") from exc
                loaded = self._reload()
                if loaded.get(row.bundle_id) != row.target:
                    self._restore(row, "the new engine did not load in the pipeline")
                    raise _Failed(f"{row.target} did not load in the pipeline; {row.from_version} restored")
        except SwitchTimeout as exc:
            self._later(row, str(exc))
            raise _Wait() from exc
        log.warning("model version switched", bundle=row.bundle_id, version=row.target, previous=row.from_version)
        deadline = time.time() + policy.health_deadline_s
        return self._move(row, S.HEALTH_GATE, health_deadline=deadline, health_ok=0, selfcheck_done=0)

    def _reload(self) -> Mapping[str, str]:
        if self.reload is None:
            return {b: v for b in self._registry().bundle_ids() if (v := self._registry().active_version(b))}
        return self.reload()

    def _restore(self, row: UpdateRow, reason: str) -> None:
        """Make ``row.from_version`` active again (inside the gate) and mark the target failed in the registry."""
        reg = self._registry()
        if row.from_version is not None:
            reg.activate(row.bundle_id, row.from_version, force=True)
        reg.record_failure(row.bundle_id, row.target, "health_gate", reason)
        self._reload()

    def _health(self, row: UpdateRow, policy: Policy) -> None:
        if row.reason is None and not row.selfcheck_done:
            ok, detail = True, "not run"
            if self.selfcheck is not None and self.settings.updates.health_selftest:
                try:
                    ok, detail = self.selfcheck()
                except Exception as exc:
                    ok, detail = False, f"{type(exc).__name__}: {exc}"
            if not ok:
                row = self.rows.move(row, S.HEALTH_GATE, reason=f"self-test failed: {detail}"[:1000])
            else:
                row = self.rows.move(row, S.HEALTH_GATE, selfcheck_done=1)
        reason = row.reason
        if reason is None and row.health_ok >= policy.health_studies:
            self._move(row, S.ACTIVE)
            log.warning("model update passed its health gate", bundle=row.bundle_id, version=row.target)
            return
        if reason is None and row.health_deadline is not None and time.time() >= row.health_deadline:
            reason = (
                f"health gate: {row.health_ok} of {policy.health_studies} studies analysed without engine errors "
                f"within {policy.health_deadline_s:g} s"
            )
        if reason is None:
            return
        if row.from_version is None:
            raise _Failed(f"{reason}; no previous version to return to, {row.target} stays active")
        try:
            with self._switch():
                if self._registry().active_version(row.bundle_id) == row.target:
                    self._restore(row, reason)
        except SwitchTimeout as exc:
            self._later(row, str(exc))
            return
        log.error("model update rolled back", bundle=row.bundle_id, version=row.target, reason=reason)
        self._move(row, S.ROLLED_BACK, reason=reason[:1000])


class _Wait(Exception):
    """The update waits (window, repository down, a study holding the gate); it resumes at a later pass."""


def runtime_options(settings: Settings) -> runtime.EngineOptions:
    """The engine options the pipeline uses (one source: appliance.models.active.engine_options)."""
    return models.engine_options(settings)
