"""Moves outbox rows onto the wire: a window of QoS 1 publishes, rows deleted only after their PUBACK.

Runs on the MQTT network thread (``HubClient`` calls ``pump`` between reads), so paho is touched by one
thread only. Acknowledged rows are deleted in batches (one fsynced transaction per batch): a crash
between PUBACK and commit re-sends a message with the same id, never loses one. On disconnect the window
is forgotten and the next connection starts again from the head of the outbox, which keeps the order.
Acknowledgements free the window at once; a committer thread deletes their rows in batches (one fsync
per batch, off the network thread), so fsyncs do not pace the stream. Until a batch is committed its
rows stay excluded from sending.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from appliance.cloud import outbox
from appliance.cloud.client import HubClient, d2c_topic
from appliance.core.background import BackgroundLoop
from appliance.core.logs import get_logger
from appliance.core.store import Store

log = get_logger(__name__)

POLL_IDLE_S = 0.5
COMMIT_INTERVAL_S = 0.02
PREFETCH = 64  # rows read ahead in one query (bodies are <= 256 KB, so at most 16 MB in memory)


def message_props(row: outbox.OutboxRow) -> dict[str, str]:
    content_type = "application/json"
    return {"$.mid": row.message_id, "$.ct": content_type, "$.ce": "utf-8", "type": row.kind, **row.props}


class OutboxSender:
    def __init__(
        self,
        store: Store,
        device_id: str,
        window: int,
        max_bytes: int,
        upload_results: Callable[[], bool] = lambda: True,
    ):
        """``window``: QoS 1 publishes in flight; ``max_bytes``: the outbox's disk budget; ``upload_results()``
        says, at each read of the outbox, whether result messages may go (the twin can pause them)."""
        self.store = store
        self.device_id = device_id
        self.window = window
        self.max_bytes = max_bytes
        self.inflight: dict[int, int] = {}  # paho mid -> outbox seq
        self.acked: list[int] = []
        self._upload_results = upload_results
        self._queued = threading.Event()  # set by notify_queued: something new may outrank what is buffered
        self.sent_total = 0
        self._last_poll = 0.0
        self._last_budget = 0.0
        self._lock = threading.Lock()
        self._uncommitted: set[int] = set()  # acknowledged, not yet deleted: never re-sent meanwhile
        self._committer = BackgroundLoop("cloud-outbox-commit", self._commit_pass, 0.5, error_delay_s=1.0)
        self._cursor: tuple[int, int] | None = None  # (priority, seq) of the last row read
        self._buffer: deque[outbox.OutboxRow] = deque()

    @property
    def upload_results(self) -> bool:
        """Whether result messages are sent now (health and audit always are)."""
        return self._upload_results()

    def notify_queued(self) -> None:
        """A message was queued: re-read the outbox at the next pump (it may outrank what is buffered)."""
        self._queued.set()

    def reset(self) -> None:
        """Connection gone: unacknowledged publishes will be re-sent; acknowledged ones still get committed."""
        self.inflight.clear()
        self._buffer.clear()
        self._cursor = None

    def start(self) -> None:
        self._committer.start()

    def stop(self) -> None:
        """Stop the committer after committing every acknowledged row."""
        self._committer.stop()
        self.flush()

    def flush(self) -> None:
        with self._lock:
            done, self.acked = self.acked, []
        if done:
            self._commit(done)

    def _commit_pass(self) -> None:
        time.sleep(COMMIT_INTERVAL_S)  # let a batch gather
        self.flush()

    def _commit(self, done: list[int]) -> None:
        conn = self.store.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                outbox.mark_sent(conn, done)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except BaseException:
            with self._lock:
                self.acked = done + self.acked
            raise
        with self._lock:
            self._uncommitted.difference_update(done)
            self.sent_total += len(done)

    def on_ack(self, mid: int) -> None:
        seq = self.inflight.pop(mid, None)
        if seq is not None:
            with self._lock:
                self.acked.append(seq)
                self._uncommitted.add(seq)
            self._committer.wake()

    def pump(self, client: HubClient, publish: bool = True) -> bool:
        did = False
        conn = self.store.conn
        now = time.monotonic()
        if not publish:
            return did
        if now - self._last_budget > 60:
            self._last_budget = now
            with self.store.transaction() as c:
                outbox.enforce_budget(c, self.max_bytes)
        free = self.window - len(self.inflight)
        if free <= 0:
            return did
        if self._queued.is_set():  # something new was queued: it may outrank what is buffered
            self._queued.clear()
            self._buffer.clear()
            self._cursor = None
            self._last_poll = 0.0
        if not self._buffer and (did or self._cursor is not None or now - self._last_poll > POLL_IDLE_S):
            self._last_poll = now
            with self._lock:
                exclude = set(self.inflight.values()) | self._uncommitted
            rows = outbox.peek(conn, PREFETCH, exclude=exclude, after=self._cursor)
            if rows:
                self._cursor = (rows[-1].priority, rows[-1].seq)
                upload = self.upload_results
                self._buffer.extend(r for r in rows if upload or r.kind != "result")
            else:
                self._cursor = None  # at the end: next time start from the head (new rows, or after a reset)
        while free > 0 and self._buffer:
            row = self._buffer[0]
            mid = client.publish_now(d2c_topic(self.device_id, message_props(row)), row.body, qos=1)
            if mid is None:
                break
            self._buffer.popleft()
            self.inflight[mid] = row.seq
            free -= 1
            did = True
        return did
