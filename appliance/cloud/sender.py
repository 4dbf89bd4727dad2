"""Moves outbox rows onto the wire: a window of QoS 1 publishes, rows deleted only after their PUBACK.

Runs on the MQTT network thread (``HubClient`` calls ``pump`` between reads), so paho is touched by one
thread only. Acknowledged rows are deleted in batches (one fsynced transaction per batch): a crash
between PUBACK and commit re-sends a message with the same id, never loses one. On disconnect the window
is forgotten and the next connection starts again from the head of the outbox, which keeps the order.
"""

from __future__ import annotations

import time

from appliance.cloud import outbox
from appliance.cloud.client import HubClient, d2c_topic
from appliance.logs import get_logger
from appliance.store import Store

log = get_logger(__name__)

POLL_IDLE_S = 0.5


def message_props(row: outbox.OutboxRow) -> dict[str, str]:
    content_type = "application/json"
    return {"$.mid": row.message_id, "$.ct": content_type, "$.ce": "utf-8", "type": row.kind, **row.props}


class OutboxSender:
    def __init__(self, store: Store, device_id: str, window: int, max_bytes: int):
        self.store = store
        self.device_id = device_id
        self.window = window
        self.max_bytes = max_bytes
        self.inflight: dict[int, int] = {}  # paho mid -> outbox seq
        self.acked: list[int] = []
        self.upload_results = True
        self.sent_total = 0
        self._last_poll = 0.0
        self._last_budget = 0.0

    def reset(self) -> None:
        """Connection gone: unacknowledged publishes will be re-sent; acknowledged ones still get committed."""
        self.inflight.clear()

    def on_ack(self, mid: int) -> None:
        seq = self.inflight.pop(mid, None)
        if seq is not None:
            self.acked.append(seq)

    def pump(self, client: HubClient, publish: bool = True) -> bool:
        did = False
        conn = self.store.conn
        if self.acked:
            done, self.acked = self.acked, []
            conn.execute("BEGIN IMMEDIATE")
            try:
                outbox.mark_sent(conn, done)
            except BaseException:
                conn.execute("ROLLBACK")
                self.acked = done + self.acked
                raise
            conn.execute("COMMIT")
            self.sent_total += len(done)
            did = True
        if not publish:
            return did
        now = time.monotonic()
        if now - self._last_budget > 60:
            self._last_budget = now
            with self.store.transaction() as c:
                outbox.enforce_budget(c, self.max_bytes)
        free = self.window - len(self.inflight)
        if free <= 0 or not (did or outbox.wakeup.is_set() or now - self._last_poll > POLL_IDLE_S):
            return did
        outbox.wakeup.clear()
        self._last_poll = now
        exclude = set(self.inflight.values())
        rows = outbox.peek(conn, free + (0 if self.upload_results else self.window), exclude=exclude)
        if not self.upload_results:
            rows = [r for r in rows if r.kind != "result"]
        for row in rows[:free]:
            mid = client.publish_now(d2c_topic(self.device_id, message_props(row)), row.body, qos=1)
            if mid is None:
                break
            self.inflight[mid] = row.seq
            did = True
        return did
