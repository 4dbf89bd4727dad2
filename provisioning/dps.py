"""Azure Device Provisioning Service (DPS) registration over MQTT: which hub, under which device id.

The flow (Microsoft's "DPS MQTT support"): connect to the DPS endpoint with client id = registration id,
username ``{id_scope}/registrations/{registration_id}/api-version=2019-03-31`` and either a SAS token
(resource ``{id_scope}/registrations/{registration_id}``, key name ``registration``) or an X.509 client
certificate; subscribe ``$dps/registrations/res/#``; publish ``iotdps-register``; while the answer is
202 "assigning", wait ``retry-after`` seconds and poll ``iotdps-get-operationstatus``; 200 "assigned"
names the hub and device id; "failed" or "disabled" end it with the service's error message. A 429 (throttled)
or 5xx answer repeats the same request after its ``retry-after``. A group enrollment's key is derived per
device before signing.
"""

from __future__ import annotations

import json
import queue
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from appliance.cloud.sas import generate_sas_token
from appliance.core.logs import get_logger

log = get_logger(__name__)

DPS_API_VERSION = "2019-03-31"
GLOBAL_ENDPOINT = "global.azure-devices-provisioning.net"


class DpsError(Exception):
    """Registration failed; the message says why (refused, rejected, timed out)."""


@dataclass(frozen=True)
class Assignment:
    hub: str
    device_id: str
    status: str
    substatus: str | None


def _tls(ca_file: str | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def register(
    *,
    id_scope: str,
    registration_id: str,
    symmetric_key: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    ca_file: str | None = None,
    host: str = GLOBAL_ENDPOINT,
    connect_host: str | None = None,
    port: int = 8883,
    payload: dict[str, Any] | None = None,
    timeout_s: float = 120.0,
    sas_ttl_s: int = 3600,
) -> Assignment:
    """Register this device with DPS and return its assignment; raises :class:`DpsError`."""
    if not symmetric_key and not cert_file:
        raise DpsError("give a symmetric key or an X.509 certificate")
    inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
    connected: queue.Queue[int] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=registration_id, protocol=mqtt.MQTTv311)
    client.username_pw_set(
        f"{id_scope}/registrations/{registration_id}/api-version={DPS_API_VERSION}",
        generate_sas_token(
            f"{id_scope}/registrations/{registration_id}", symmetric_key, int(time.time() + sas_ttl_s), "registration"
        )
        if symmetric_key
        else None,
    )
    client.tls_set_context(_tls(ca_file, cert_file, key_file))
    client.on_connect = lambda c, u, f, rc, p=None: connected.put(rc.value if hasattr(rc, "value") else int(rc))
    client.on_message = lambda c, u, m: inbox.put((m.topic, bytes(m.payload)))
    deadline = time.monotonic() + timeout_s
    try:
        client.connect(connect_host or host, port, keepalive=60)
    except (OSError, ssl.SSLError) as exc:
        raise DpsError(f"cannot reach DPS at {connect_host or host}:{port}: {exc}") from exc
    client.loop_start()
    try:
        try:
            rc = connected.get(timeout=max(1.0, deadline - time.monotonic()))
        except queue.Empty as exc:
            raise DpsError("DPS did not answer the connection") from exc
        if rc != 0:
            raise DpsError(f"DPS refused the connection (CONNACK {rc}): check id scope, registration id and key")
        client.subscribe("$dps/registrations/res/#", qos=1)
        rid = 1
        body = json.dumps({"registrationId": registration_id, "payload": payload}).encode()
        # (topic before $rid, topic after it, payload) of the request the next retry repeats
        request = ("$dps/registrations/PUT/iotdps-register/", "", body)
        client.publish(f"{request[0]}?$rid={rid}{request[1]}", body, qos=1)
        throttled = 0
        while True:
            status, props, doc = _answer(inbox, rid, deadline)
            state = doc.get("registrationState") or {}
            if status == 200 and doc.get("status") == "assigned":
                a = Assignment(state["assignedHub"], state["deviceId"], "assigned", state.get("substatus"))
                log.info("DPS assigned", registration_id=registration_id, hub=a.hub, device_id=a.device_id)
                return a
            if status == 429 or status >= 500:  # throttled or busy: the same request again after retry-after
                throttled += 1
                wait = _retry_after(props, default=min(60.0, 2.0**throttled))
                log.warning("DPS throttled the registration; retrying", status=status, retry_after_s=wait)
            elif status in (200, 202) and doc.get("status") in ("assigning", "unassigned", None):
                op = doc.get("operationId")
                if not op:
                    raise DpsError(f"DPS answered {status} without an operationId")
                wait = _retry_after(props, default=2.0)
                request = ("$dps/registrations/GET/iotdps-get-operationstatus/", f"&operationId={op}", b"")
            elif doc.get("status") in ("failed", "disabled") or state.get("status") in ("failed", "disabled"):
                outcome = doc.get("status") if doc.get("status") in ("failed", "disabled") else state.get("status")
                message = state.get("errorMessage") or doc.get("message") or "no message given"
                code = state.get("errorCode") or doc.get("errorCode")
                raise DpsError(f"DPS registration {outcome}: {message}" + (f" (error code {code})" if code else ""))
            else:
                reason = doc.get("message") or doc.get("errorMessage") or doc.get("status") or "no reason given"
                raise DpsError(f"DPS registration failed ({status}): {reason}")
            if time.monotonic() + wait > deadline:
                raise DpsError(f"DPS registration timed out (last answer {status}, retry-after {wait:g} s)")
            time.sleep(wait)
            rid += 1
            client.publish(f"{request[0]}?$rid={rid}{request[1]}", request[2], qos=1)
    finally:
        client.disconnect()
        client.loop_stop()


def _retry_after(props: dict[str, list[str]], default: float) -> float:
    """The answer's ``retry-after`` (seconds, as DPS sends it in the topic), bounded to 0.5..60 s."""
    try:
        value = float(props.get("retry-after", [str(default)])[0])
    except ValueError:
        value = default
    return min(max(value, 0.5), 60.0)


def _answer(inbox: queue.Queue[tuple[str, bytes]], rid: int, deadline: float) -> tuple[int, dict, dict]:
    """The response to request ``rid``: (status, topic properties, JSON body)."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DpsError("DPS did not answer in time")
        try:
            topic, data = inbox.get(timeout=left)
        except queue.Empty:
            continue
        head, _, query = topic.partition("/?")
        props = parse_qs(query)
        if props.get("$rid", [""])[0] != str(rid) or not head.startswith("$dps/registrations/res/"):
            continue
        try:
            status = int(head.rsplit("/", 1)[1])
            doc = json.loads(data) if data else {}
        except ValueError as exc:
            raise DpsError(f"DPS sent an unreadable answer on {topic!r}") from exc
        return status, props, doc if isinstance(doc, dict) else {}
