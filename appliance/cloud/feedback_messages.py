"""Radiologists' feedback -> encrypted outbox message: the cloud side of the worklist's ``FeedbackPublisher`` port.

Like :mod:`appliance.cloud.result_messages`: :meth:`CloudFeedbackPublisher.build` de-identifies and encrypts one
feedback revision with the recipient keys in force, outside any database transaction; :meth:`enqueue` queues it
in the caller's transaction (the one that records the feedback row and its audit entry); :meth:`committed` wakes
the sender. The message id is stable per (result message, label, kind, revision), so a resend is a duplicate
the central store drops and a changed verdict is a new message.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from appliance.cloud import deid, outbox, payload
from appliance.cloud.overlay import CloudOverlay
from appliance.core.config import Settings


class CloudFeedbackPublisher:
    """Builds and queues ``feedback`` messages (implements ``appliance.worklist.feedback.FeedbackPublisher``)."""

    def __init__(self, settings: Settings, overlay: CloudOverlay, on_queued: Callable[[], None] = lambda: None):
        self._settings = settings
        self._overlay = overlay
        self.on_queued = on_queued  # set by the composition root once the agent's sender exists

    def build(self, feedback: dict[str, Any]) -> tuple[str, bytes]:
        """(message id, encrypted body) of one feedback revision (``payload.build_feedback_message`` input).
        Raises ``ValueError`` (a field that would not be de-identified, too large) or ``OSError`` (the device
        secret cannot be read)."""
        secret = deid.load_or_create_device_secret(self._settings.secrets_dir)
        keys = self._overlay.current().recipient_keys
        return payload.build_feedback_message(feedback, self._settings, secret, recipient_keys=keys)

    def enqueue(self, conn: sqlite3.Connection, message_id: str, body: bytes) -> bool:
        """Queue it in the caller's transaction; False if this message id is already queued."""
        return outbox.enqueue(
            conn,
            kind="feedback",
            message_id=message_id,
            body=body,
            ttl_s=self._overlay.current().outbox_ttl_s,
            max_bytes=self._settings.cloud.outbox_max_bytes,
        )

    def committed(self) -> None:
        """The transaction that queued messages has committed: the sender may look now."""
        self.on_queued()
