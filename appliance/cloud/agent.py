"""The cloud agent: the daemon service that keeps the box in sync with IoT Hub.

It owns a :class:`HubClient` (connection), an :class:`OutboxSender` (D2C from the durable outbox), the
twin state, the direct-method dispatcher and a health reporter. Incoming messages are handled off the
network thread (a worker thread for twin/C2D, a small pool for methods) so a slow method never stalls
the connection. Integration points are constructor arguments: method hooks, extra reported properties,
a C2D hook and a desired-properties hook. What the twin may change at run time lives in the settings overlay
(:class:`~appliance.cloud.overlay.CloudOverlay`); the ``Settings`` from the config file are never mutated.
"""

from __future__ import annotations

import json
import queue
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote

from appliance import __version__
from appliance.cloud import methods as methods_mod
from appliance.cloud import outbox, payload
from appliance.cloud.client import HubClient
from appliance.cloud.overlay import CloudOverlay
from appliance.cloud.sender import OutboxSender
from appliance.cloud.twin import MAX_TWIN_BYTES, Desired, TwinState, twin_size
from appliance.core.config import Settings
from appliance.core.logs import get_logger
from appliance.core.store import Store

log = get_logger(__name__)

MAX_C2D_BYTES = 64 * 1024
C2DHook = Callable[[dict[str, str], Any], None]
"""(properties, parsed JSON body). Return only once what it keeps is durable: the message is acknowledged to the
hub after it returns. ValueError rejects the message (acknowledged, reported in ``last_c2d``); any other
exception leaves it unacknowledged, so the hub delivers it again after the next reconnect."""


def _iso(ts: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else None


class CloudAgent:
    """Daemon ``Service``: ``name``, ``start()``, ``stop()``."""

    name = "cloud"

    def __init__(
        self,
        settings: Settings,
        store: Store | None = None,
        method_hooks: dict[str, methods_mod.MethodHandler] | None = None,
        reported_hook: Callable[[], dict[str, Any]] | None = None,
        c2d_hook: C2DHook | None = None,
        desired_hook: Callable[[Desired], None] | None = None,
        time_fn: Callable[[], float] = time.time,
        overlay: CloudOverlay | None = None,
    ):
        self.settings = settings
        self.store = store or Store(settings.db_path)
        self.overlay = overlay or CloudOverlay(settings.cloud, self.store)
        self.reported_hook = reported_hook
        self.c2d_hook = c2d_hook
        self.desired_hook = desired_hook
        handlers: dict[str, methods_mod.MethodHandler] = {
            name: methods_mod.not_available(name) for name in methods_mod.HOOKED_METHODS
        }
        handlers["ping"] = self._ping
        handlers["get_status"] = lambda _payload: (200, self.status())
        handlers.update(method_hooks or {})
        self.methods = methods_mod.MethodDispatcher(handlers)
        # Hand paho twice its in-flight window: the next messages wait in paho's queue and go out the moment
        # a PUBACK frees a slot, without a round trip through the outbox.
        self.sender = OutboxSender(
            self.store,
            settings.cloud.device_id,
            2 * settings.cloud.max_inflight,
            settings.cloud.outbox_max_bytes,
            upload_results=lambda: self.overlay.current().upload_results,
        )
        self.client = HubClient(settings, self, time_fn=time_fn)
        self.twin = TwinState(lambda: self.store.conn, self._apply_desired)
        self.last_c2d: dict[str, Any] | None = None
        self._inbox: queue.Queue[tuple[str, bytes] | tuple[str, bytes, Callable[[], None]] | None] = queue.Queue()
        self._pool: ThreadPoolExecutor | None = None
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        self._rid = 0
        self._pending_get: str | None = None
        self._pending_get_at = 0.0
        self._pending_reported: dict[str, float] = {}  # rid -> monotonic time sent (PATCH awaiting its answer)
        self._buffered_patches: list[tuple[bytes, int | None]] = []
        self._reported_dirty = threading.Event()
        self._next_health = 0.0
        self._get_attempts = 0
        self._retry_get_at: float | None = None

    # ---------------------------------------------------------------- Service
    @property
    def health_interval_s(self) -> float:
        """Seconds between health messages (config, or the twin's overlay)."""
        return self.overlay.current().health_interval_s

    def start(self) -> None:
        self._stop.clear()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cloud-method")
        self._worker = threading.Thread(target=self._work, name="cloud-agent", daemon=True)
        self._worker.start()
        self.sender.start()
        self.client.start()
        log.info("cloud agent started", device_id=self.settings.cloud.device_id, hub=self.settings.cloud.hub_hostname)

    def stop(self) -> None:
        self._stop.set()
        self.client.stop()
        self.sender.stop()
        self._inbox.put(None)
        if self._worker is not None:
            self._worker.join(10)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        log.info("cloud agent stopped")

    # ---------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        conn = self.store.conn
        count, size = outbox.depth(conn)
        return {
            "device_id": self.settings.cloud.device_id,
            "software_version": __version__,
            "connected": self.client.ready,
            "connects": self.client.connects,
            "last_error": self.client.last_error,
            "studies": self.store.state_counts(),
            "outbox": {
                "depth": count,
                "bytes": size,
                "by_kind": outbox.counts_by_kind(conn),
                "sent": self.sender.sent_total,
            },
            "desired": self.twin.status,
            "time": _iso(time.time()),
        }

    def _ping(self, payload: Any) -> tuple[int, Any]:
        return 200, {
            "pong": True,
            "device_id": self.settings.cloud.device_id,
            "echo": payload,
            "time": _iso(time.time()),
        }

    # ---------------------------------------------------------------- ConnectionHandler (network thread)
    def on_ready(self) -> None:
        self.sender.reset()
        self._inbox.put(("$ready", b""))

    def on_disconnected(self) -> None:
        self.sender.reset()
        self._pending_get = None

    def on_ack(self, mid: int) -> None:
        self.sender.on_ack(mid)

    def in_flight(self) -> int:
        return len(self.sender.inflight)

    def on_message(self, topic: str, data: bytes, ack: Callable[[], None] | None = None) -> None:
        if topic.startswith("$iothub/methods/POST/"):
            req = methods_mod.parse_request(topic)
            if req is not None and self._pool is not None:
                self._pool.submit(self._run_method, req[0], req[1], data)
            return
        self._inbox.put((topic, data) if ack is None else (topic, data, ack))

    def pump(self, client: HubClient, publish: bool = True) -> bool:
        return self.sender.pump(client, publish)

    # ---------------------------------------------------------------- worker thread
    def _run_method(self, name: str, rid: str, data: bytes) -> None:
        status, body = self.methods.dispatch(name, data)
        self.client.submit(methods_mod.response_topic(status, rid), body, qos=0)

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._inbox.get(timeout=0.2)
            except queue.Empty:
                item = ("$tick", b"")
            if item is None:
                break
            topic, data = item[0], item[1]
            try:
                self._handle(topic, data)
            except Exception:
                log.exception("cloud message handling failed; not acknowledged, continuing", topic=topic)
                continue
            if len(item) == 3:
                item[2]()  # handled (and whatever the hook keeps, kept): now the hub may forget it

    def _next_rid(self) -> str:
        self._rid += 1
        return str(self._rid)

    def _twin_get(self) -> None:
        rid = self._next_rid()
        self._pending_get = rid
        self._pending_get_at = time.monotonic()
        self.client.submit(f"$iothub/twin/GET/?$rid={rid}", b"", qos=0)

    def _patch_reported(self, body: bytes) -> None:
        rid = self._next_rid()
        self._pending_reported[rid] = time.monotonic()
        self.client.submit(f"$iothub/twin/PATCH/properties/reported/?$rid={rid}", body, qos=0)

    def _handle(self, topic: str, data: bytes) -> None:
        if topic == "$ready":
            self._buffered_patches.clear()
            self._pending_reported.clear()  # answers of the old connection never come; ready resends everything
            self._get_attempts = 0
            self._twin_get()
        elif topic == "$tick":
            pass
        elif topic == "$reported":
            if self.client.ready and self._pending_get is None:
                self._patch_reported(data)
            else:
                self._reported_dirty.set()
        elif topic.startswith("$iothub/twin/res/"):
            self._on_twin_response(topic, data)
        elif topic.startswith("$iothub/twin/PATCH/properties/desired/"):
            version = _query(topic).get("$version")
            v = int(version) if version and version.isdigit() else None
            if self._pending_get is not None:
                self._buffered_patches.append((data, v))  # applied after the full GET, if newer
            elif v is not None and self.twin.version and v > self.twin.version + 1:
                # the hub numbers desired versions one by one: a gap means a patch never arrived
                log.warning("desired patch skipped a version; reading the whole twin", have=self.twin.version, got=v)
                self._buffered_patches.append((data, v))
                self._twin_get()
            elif self.twin.on_patch(data, v):
                self._reported_dirty.set()
        elif topic.startswith(f"devices/{self.settings.cloud.device_id}/messages/devicebound/"):
            self._on_c2d(topic, data)
        else:
            log.warning("message on an unexpected topic ignored", topic=topic)
        self._periodic()

    def _periodic(self) -> None:
        now = time.monotonic()
        timeout = self.settings.cloud.twin_timeout_s
        if self._pending_get is not None and now - self._pending_get_at > timeout and self.client.ready:
            log.warning(
                "twin GET unanswered; asking again", rid=self._pending_get, waited_s=round(now - self._pending_get_at)
            )
            self._twin_get()
        late = [rid for rid, at in self._pending_reported.items() if now - at > timeout]
        if late:
            log.warning("reported properties unanswered; sending them again", rids=late)
            for rid in late:
                del self._pending_reported[rid]
            self._reported_dirty.set()  # the whole reported document carries every value again
        if self._retry_get_at is not None and now >= self._retry_get_at and self.client.ready:
            self._retry_get_at = None
            self._twin_get()
        if self._reported_dirty.is_set() and self.client.ready and self._pending_get is None:
            self._reported_dirty.clear()
            self._send_reported()
        if now >= self._next_health:
            self._next_health = now + self.health_interval_s
            self._enqueue_health()

    def _on_twin_response(self, topic: str, data: bytes) -> None:
        status_s, _, query = topic[len("$iothub/twin/res/") :].partition("/?")
        q = _query("?" + query)
        status = int(status_s) if status_s.isdigit() else 0
        rid = q.get("$rid")
        if rid is not None and rid == self._pending_get:
            if status == 200:
                self._pending_get = None
                self.twin.on_full(data)
                for patch, v in self._buffered_patches:
                    self.twin.on_patch(patch, v)
                self._buffered_patches.clear()
                self._reported_dirty.set()
            else:
                self._get_attempts += 1
                delay = min(100.0, 2**self._get_attempts) if status in (429, 500, 503) else 30.0
                log.warning("twin GET failed; retrying", status=status, retry_in_s=delay)
                self._pending_get = None
                self._retry_get_at = time.monotonic() + delay
        elif (rid is not None and self._pending_reported.pop(rid, None) is not None and status == 204) or status == 204:
            log.debug("reported properties accepted", version=q.get("$version"))
        elif status in (429, 500, 503):
            log.warning("reported properties throttled; will resend", status=status)
            self._reported_dirty.set()
        elif status >= 400:
            log.error(
                "reported properties refused by the hub", status=status, body=data[:200].decode("utf-8", "replace")
            )

    def reported(self) -> dict[str, Any]:
        conn = self.store.conn
        count, size = outbox.depth(conn)
        row = conn.execute("SELECT MAX(created_at) FROM studies").fetchone()
        try:
            du = shutil.disk_usage(self.settings.state_dir)
            disk = {"free_bytes": du.free, "total_bytes": du.total}
        except OSError:
            disk = None
        doc: dict[str, Any] = {
            "software_version": __version__,
            "bundles_active": [],
            "backend": self.settings.engines.backend,
            "gpu": None,
            "outbox": {"depth": count, "bytes": size},
            # to the hour only: health is plaintext, and a study's time to the second helps link it to a patient
            "last_study_at": _iso(row[0] - row[0] % 3600) if row and row[0] else None,
            "disk": disk,
            "desired_status": self.twin.status or None,
            "last_c2d": self.last_c2d,
        }
        if self.reported_hook is not None:
            try:
                doc.update(self.reported_hook())
            except Exception:
                log.exception("reported-properties hook failed")
        return doc

    def report_changed(self) -> None:
        """Something in the reported properties changed (e.g. a model loaded): send them at the next chance."""
        self._reported_dirty.set()

    def report_patch(self, patch: dict[str, Any]) -> None:
        """Send ``patch`` as its own reported-properties PATCH, in order with the others (a state machine's every
        step reaches the hub, not only the last one); while disconnected the full report at reconnect carries
        the latest values instead. Thread-safe."""
        self._inbox.put(("$reported", json.dumps(patch).encode()))

    def _send_reported(self) -> None:
        doc = self.reported()
        size = twin_size(doc)
        if size > MAX_TWIN_BYTES:  # the hub would refuse it (400) again and again: say so once, locally
            log.error("reported properties over the 32 KB twin limit; not sent", size=size, keys=sorted(doc))
            return
        self._patch_reported(json.dumps(doc).encode())

    def _enqueue_health(self) -> None:
        try:
            health = {"studies": self.store.state_counts(), "reported": self.reported()}
            mid, body = payload.build_health_message(health, self.settings)
            with self.store.transaction() as conn:
                outbox.enqueue(
                    conn,
                    kind="health",
                    message_id=mid,
                    body=body,
                    ttl_s=self.overlay.current().outbox_ttl_s,
                    max_bytes=self.settings.cloud.outbox_max_bytes,
                )
            self.sender.notify_queued()
        except Exception:
            log.exception("health message could not be queued")

    def _on_c2d(self, topic: str, data: bytes) -> None:
        bag = topic.split("/messages/devicebound/", 1)[1]
        props = {unquote(k): unquote(v) for k, _, v in (p.partition("=") for p in bag.split("&") if p)}
        mid = props.get("$.mid")
        try:
            if len(data) > MAX_C2D_BYTES:
                raise ValueError(f"C2D message of {len(data)} bytes is over the 64 KB limit")
            try:
                body = json.loads(data) if data.strip() else None
            except RecursionError as exc:
                raise ValueError("C2D body is nested too deep") from exc
            except (ValueError, UnicodeDecodeError) as exc:
                raise ValueError(f"C2D body is not JSON: {exc}") from exc
            if self.c2d_hook is not None:
                self.c2d_hook(props, body)
            self.last_c2d = {"message_id": mid, "status": "accepted", "reason": None, "at": _iso(time.time())}
            log.info("C2D message received", message_id=mid)
        except ValueError as exc:
            self.last_c2d = {"message_id": mid, "status": "rejected", "reason": str(exc)[:500], "at": _iso(time.time())}
            log.warning("C2D message rejected", message_id=mid, reason=str(exc))
        self._reported_dirty.set()

    def _apply_desired(self, desired: Desired, version: int) -> None:
        """Put a fully valid desired document in force (the overlay persists it); raising rejects it."""
        if self.desired_hook is not None:
            self.desired_hook(desired)
        current = self.overlay.apply(desired, version)
        self._next_health = min(self._next_health, time.monotonic() + current.health_interval_s)


def _query(topic: str) -> dict[str, str]:
    q = topic.partition("?")[2]
    return {k: unquote(v) for k, _, v in (p.partition("=") for p in q.split("&") if p)}
