"""The central team's reader of device-to-cloud messages: a result is accepted only from the device that sent it.

An envelope (:mod:`appliance.cloud.crypto`) names its device in ``meta.device``, but the recipients' public keys
are public: anyone holding one can seal an envelope claiming any device. What a device cannot forge is the
identity IoT Hub stamps on each message from the connection it authenticated: the system property
``iothub-connection-device-id`` (Microsoft, "Create and read IoT Hub messages"). So a message is accepted only when
the envelope's device (checked before decryption, and again in the authenticated metadata after it) equals that
identity. Each message is judged alone: a malformed or refused one is reported with its reason and the rest are
still read.

Input (one per line, as exported from the hub's Event Hubs-compatible endpoint)::

    {"system_properties": {"iothub-connection-device-id": "box-17", ...}, "properties": {...},
     "body": "<envelope JSON text>"}            # or "body_b64": base64 of the body bytes

or, routed by IoT Hub to a storage endpoint (Avro, read by :mod:`appliance.central.sources`), a record
``{"EnqueuedTimeUtc", "Properties", "SystemProperties": {"connectionDeviceId": ...}, "Body": bytes}``: the same
identity under its routing name (:func:`open_record` takes either shape, already parsed).

A bare envelope (no system properties) has no hub identity; it is accepted only when the caller vouches for the
identity (``hub_device_id``, e.g. ``appliance central decrypt --device``), having taken it from the hub.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from appliance.cloud import crypto

IDENTITY = "iothub-connection-device-id"
ROUTED_IDENTITY = "connectionDeviceId"  # the same identity in a record routed to storage (Avro)


class Refused(Exception):
    """A message the reader does not accept; ``reason``: ``malformed``, ``no_identity``, ``sender_mismatch``,
    ``undecryptable`` (and, from :mod:`appliance.central.flatten`, ``unknown_schema`` or ``invalid``)."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class Opened:
    """An accepted message: the hub's sender identity, the authenticated envelope metadata, the plaintext."""

    device: str
    meta: dict[str, Any]
    plaintext: bytes


def _event_body_and_identity(doc: Mapping[str, Any]) -> tuple[bytes, str | None]:
    """(body, hub identity) of one event in either shape the hub hands out: a routed record (Avro storage endpoint:
    ``SystemProperties.connectionDeviceId``, ``Body`` bytes) or an exported event (``system_properties`` with
    ``iothub-connection-device-id``, ``body`` text or ``body_b64``)."""
    if "SystemProperties" in doc:  # IoT Hub routing to storage (Microsoft.Azure.Devices.Message)
        system = doc.get("SystemProperties")
        if not isinstance(system, Mapping):
            raise Refused("malformed", "SystemProperties is not a map")
        identity = system.get(ROUTED_IDENTITY)
        if not isinstance(identity, str) or not identity:
            raise Refused("no_identity", f"the hub stamped no {ROUTED_IDENTITY}")
        body = doc.get("Body")
        if not isinstance(body, (bytes, bytearray)):
            raise Refused("malformed", "record without a Body")
        return bytes(body), identity
    system = doc.get("system_properties")
    if system is None:
        raise Refused("no_identity", f"an event without system_properties has no {IDENTITY}")
    if not isinstance(system, Mapping):
        raise Refused("malformed", "system_properties is not an object")
    identity = system.get(IDENTITY)
    if not isinstance(identity, str) or not identity:
        raise Refused("no_identity", f"the hub stamped no {IDENTITY}")
    if isinstance(doc.get("body"), str):
        return doc["body"].encode("utf-8"), identity
    if isinstance(doc.get("body"), dict):
        return json.dumps(doc["body"]).encode("utf-8"), identity
    if isinstance(doc.get("body_b64"), str):
        try:
            return base64.b64decode(doc["body_b64"], validate=True), identity
        except ValueError as exc:
            raise Refused("malformed", f"body_b64 is not base64: {exc}") from exc
    raise Refused("malformed", "event without body or body_b64")


def _body_and_identity(line: bytes, hub_device_id: str | None) -> tuple[bytes, str | None]:
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Refused("malformed", f"not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise Refused("malformed", f"a JSON {type(doc).__name__}, not an object")
    if "system_properties" not in doc:  # a bare envelope
        return line, hub_device_id
    return _event_body_and_identity(doc)


def _open(body: bytes, identity: str, private_keys: Mapping[str, str]) -> Opened:
    try:
        claimed = json.loads(body)["meta"]["device"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise Refused("malformed", f"not an envelope: {exc}") from exc
    if claimed != identity:
        raise Refused("sender_mismatch", f"envelope claims device {str(claimed)[:80]!r}, the hub says {identity!r}")
    try:
        meta, plain = crypto.decrypt(body, dict(private_keys))
    except crypto.DecryptError as exc:
        raise Refused("undecryptable", str(exc)) from exc
    except Exception as exc:  # a hostile envelope must not stop the reader: report it as the message's fault
        raise Refused("malformed", f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("device") != identity:  # the authenticated copy (AEAD associated data)
        got = meta.get("device") if isinstance(meta, dict) else None
        raise Refused("sender_mismatch", f"authenticated metadata names {got!r}, not {identity!r}")
    return Opened(identity, meta, plain)


def open_record(record: Mapping[str, Any], private_keys: Mapping[str, str]) -> Opened | Refused:
    """Open one hub event, already parsed: a record routed to storage (the Avro ``Microsoft.Azure.Devices.Message``
    shape: ``SystemProperties``, ``Body``) or an exported event (``system_properties``, ``body``/``body_b64``).

    Returns :class:`Opened`, or the :class:`Refused` (not raised: an engine mapping over records, e.g. Spark's
    ``mapPartitions``, keeps it as a row) for any input. The envelope's device, before and after decryption, must
    equal the identity the hub stamped (``connectionDeviceId`` / ``iothub-connection-device-id``). Pure: no I/O,
    one record's memory."""
    try:
        if not isinstance(record, Mapping):
            raise Refused("malformed", f"a {type(record).__name__}, not a record")
        body, identity = _event_body_and_identity(record)
        assert identity is not None
        return _open(body, identity, private_keys)
    except Refused as exc:
        return exc


def open_message(line: bytes, private_keys: Mapping[str, str], hub_device_id: str | None = None) -> Opened:
    """Open one exported event (or a bare envelope vouched for by ``hub_device_id``) with the recipients' private
    keys (key id -> base64 X25519). Raises :class:`Refused`; never anything else for any input bytes."""
    body, identity = _body_and_identity(line, hub_device_id)
    if identity is None:
        raise Refused("no_identity", f"a bare envelope has no {IDENTITY}: give the device the hub reported")
    return _open(body, identity, private_keys)
