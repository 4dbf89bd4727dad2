"""IoT Hub device connection on paho-mqtt 2.x: MQTT 3.1.1 over TLS 1.2, SAS or X.509, renewal, backoff.

One supervisor thread owns the paho client (a fresh one per connection, so no stale in-flight state
survives a reconnect: the durable outbox re-sends instead). Other threads hand publishes over with
:meth:`HubClient.submit`; the handler's ``pump`` runs on the same thread between network reads, which is
where the outbox publishes. SAS tokens cannot be refreshed on a live MQTT connection, so the client
reconnects at ``sas_renew_fraction`` of the token lifetime, after letting in-flight publishes finish.
"""

from __future__ import annotations

import functools
import os
import queue
import random
import ssl
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from appliance.cloud import sas
from appliance.core.config import Settings
from appliance.core.logs import get_logger
from durable.ownership import service_owner

log = get_logger(__name__)


class CredentialError(OSError):
    """The device's own credential files cannot be read (permissions, missing): no connection is attempted."""


class ConnectionHandler(Protocol):
    def on_ready(self) -> None: ...  # connected and subscribed
    def on_message(self, topic: str, payload: bytes, ack: Callable[[], None] | None = None) -> None: ...
    # ``ack``: for a QoS 1 message (C2D), acknowledges it to the hub; call it once the message is durably
    # handled. Never called = never acknowledged: the hub delivers it again after the next reconnect.
    def on_ack(self, mid: int) -> None: ...
    def on_disconnected(self) -> None: ...
    def pump(self, client: HubClient, publish: bool = True) -> bool: ...  # True if it did something
    def in_flight(self) -> int: ...


@functools.lru_cache(maxsize=256)
def _quote_const(s: str, safe: str) -> str:
    return quote(s, safe=safe)


def d2c_topic(device_id: str, props: dict[str, str]) -> str:
    """``devices/{id}/messages/events/{property bag}``, keys and values percent-encoded (quote, not quote_plus)."""
    bag = "&".join(
        f"{_quote_const(k, '$.')}={quote(v, safe='') if k == '$.mid' else _quote_const(v, '')}"
        for k, v in props.items()
    )
    return f"devices/{device_id}/messages/events/{bag}"


def subscriptions(device_id: str) -> list[tuple[str, int]]:
    """Four of IoT Hub's five allowed subscriptions; never QoS 2."""
    return [
        (f"devices/{device_id}/messages/devicebound/#", 1),
        ("$iothub/twin/res/#", 0),
        ("$iothub/twin/PATCH/properties/desired/#", 0),
        ("$iothub/methods/POST/#", 0),
    ]


def credential_files(settings: Settings) -> tuple[Path, Path, Path]:
    """Where the device's IoT Hub credentials are read from: (SAS key (base64), X.509 certificate (PEM), X.509
    private key (PEM)): the ``cloud.*_file`` settings, else ``secrets/device_key``, ``device.crt``, ``device.key``."""
    c, secrets = settings.cloud, settings.secrets_dir
    return (
        Path(c.device_key_file) if c.device_key_file else secrets / "device_key",
        Path(c.cert_file) if c.cert_file else secrets / "device.crt",
        Path(c.key_file) if c.key_file else secrets / "device.key",
    )


def presented_credentials(settings: Settings) -> list[Path]:
    """The credential files this box presents with its ``cloud.auth``: the SAS key, or the certificate and key."""
    key, cert, cert_key = credential_files(settings)
    return [key] if settings.cloud.auth == "sas" else [cert, cert_key]


def _readable_by(st: os.stat_result, uid: int, gid: int) -> bool:
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IRUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IRGRP)
    return bool(st.st_mode & stat.S_IROTH)


def credential_problems(settings: Settings) -> list[str]:
    """Why the box could not authenticate to the hub, one sentence per file (empty: the files are there and
    readable). Checks that this process can read each credential file and, when it runs as root on a state
    directory owned by the service user, that the service user can too (a root-owned 0600 key would make the
    daemon retry for ever). Never raises for a file problem."""
    problems = []
    owner = service_owner(settings.state_dir)
    for path in presented_credentials(settings):
        try:
            st = path.stat()
            with open(path, "rb") as fh:
                empty = not fh.read(1)
        except FileNotFoundError:
            problems.append(f"{path}: missing: provision this box (appliance provision dps) or set the file")
            continue
        except OSError as exc:
            problems.append(f"{path}: cannot be read ({exc.strerror}): give it to the service user, mode 0600")
            continue
        mode = f"{stat.S_IMODE(st.st_mode):04o}"
        if owner is not None and not _readable_by(st, *owner):
            problems.append(
                f"{path}: the service user (uid {owner[0]}) cannot read it (owner uid {st.st_uid}, mode {mode}): "
                f"chown {owner[0]}:{owner[1]} {path}"
            )
        elif empty:
            problems.append(f"{path}: empty")
    return problems


class HubClient:
    """Keeps one authenticated MQTT connection to IoT Hub alive; see the module docstring."""

    def __init__(self, settings: Settings, handler: ConnectionHandler, time_fn: Callable[[], float] = time.time):
        c = settings.cloud
        self.cfg = c
        self.device_id = c.device_id
        self.host = c.connect_host or c.hub_hostname
        self.handler = handler
        self.time_fn = time_fn
        self.key_file, self.cert_file, self.cert_key_file = credential_files(settings)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._outq: queue.Queue[tuple[str, bytes, int]] = queue.Queue()
        self._acks: queue.Queue[tuple[int, int]] = queue.Queue()  # (connection number, message id) to PUBACK
        self._client: mqtt.Client | None = None
        self.connected = False
        self.ready = False
        self.connects = 0
        self.last_error: str | None = None
        self.connected_since: float | None = None
        self._sub_mid: int | None = None
        self._refused: str | None = None
        self._lost = False
        self._last_clock_log = 0.0

    # ---------------------------------------------------------------- public
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="cloud-mqtt", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, topic: str, payload: bytes, qos: int = 0) -> None:
        """Publish from any thread (QoS 0/1); dropped if the connection is down (callers retry at app level)."""
        if qos not in (0, 1):
            raise ValueError("IoT Hub does not support QoS 2")
        self._outq.put((topic, payload, qos))

    def publish_now(self, topic: str, payload: bytes, qos: int = 1) -> int | None:
        """Publish on the network thread (from ``pump``); the paho message id, or None if not connected."""
        client = self._client
        if client is None or not self.connected:
            return None
        info = client.publish(topic, payload, qos=qos)
        return info.mid if info.rc == mqtt.MQTT_ERR_SUCCESS else None

    # ---------------------------------------------------------------- connection
    def _tls(self) -> ssl.SSLContext:
        try:
            return self._tls_context()
        except PermissionError as exc:
            raise CredentialError(f"certificate or key {exc.filename} cannot be read: {exc.strerror}") from exc

    def _tls_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # what IoT Hub documents; 1.3 is not needed
        if self.cfg.ca_file:
            ctx.load_verify_locations(self.cfg.ca_file)
        else:
            ctx.load_default_certs()
        if self.cfg.auth == "x509":
            ctx.load_cert_chain(str(self.cert_file), str(self.cert_key_file))
        return ctx

    def _new_client(self) -> tuple[mqtt.Client, float]:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.device_id,
            clean_session=False,  # keeps queued C2D messages across reconnects
            protocol=mqtt.MQTTv311,
        )
        client.manual_ack_set(True)  # C2D is acknowledged once handled (ack callback), not on arrival
        client.max_inflight_messages_set(self.cfg.max_inflight)
        # Our outbox never hands paho more than max_inflight; the queue must exceed that largest burst.
        client.max_queued_messages_set(self.cfg.max_inflight * 4 + 64)
        client.tls_set_context(self._tls())
        renew_at = float("inf")
        if self.cfg.auth == "sas":
            try:
                key = self.key_file.read_text(encoding="ascii").strip()
            except OSError as exc:
                raise CredentialError(f"device key {self.key_file} cannot be read: {exc.strerror}") from exc
            token, expiry = sas.device_token(
                self.cfg.hub_hostname, self.device_id, key, self.cfg.sas_ttl_s, self.time_fn()
            )
            client.username_pw_set(sas.username(self.cfg.hub_hostname, self.device_id), token)
            renew_at = time.monotonic() + self.cfg.sas_ttl_s * self.cfg.sas_renew_fraction
        else:
            client.username_pw_set(sas.username(self.cfg.hub_hostname, self.device_id), None)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client, renew_at

    def _backoff(self, attempt: int) -> float:
        base = min(self.cfg.backoff_max_s, self.cfg.backoff_min_s * (2 ** min(attempt, 20)))
        return base + random.uniform(0, self.cfg.backoff_jitter_s)

    def _check_clock(self) -> None:
        problem = sas.clock_problem(self.time_fn()) if self.cfg.auth == "sas" else None
        if problem and time.monotonic() - self._last_clock_log > 60:
            self._last_clock_log = time.monotonic()
            log.error("clock far off: IoT Hub will refuse this device's SAS tokens", problem=problem)
            self.last_error = problem

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            self._check_clock()
            try:
                client, renew_at = self._new_client()
                self._refused, self._lost, self._sub_mid = None, False, None
                client.connect(self.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
            except CredentialError as exc:  # not a network problem: it stays until someone fixes the file
                attempt += 1
                delay = self._backoff(attempt)
                self.last_error = f"cannot authenticate: {exc}"
                log.error("IoT Hub not contacted: this box cannot read its identity", error=str(exc))
                self._stop.wait(delay)
                continue
            except (OSError, ssl.SSLError, ValueError) as exc:
                attempt += 1
                delay = self._backoff(attempt)
                self.last_error = f"connect failed: {exc}"
                log.warning(
                    "IoT Hub connect failed",
                    host=self.host,
                    port=self.cfg.port,
                    error=str(exc),
                    retry_in_s=round(delay, 1),
                )
                self._stop.wait(delay)
                continue
            self._client = client
            renewed = self._serve(client, renew_at)
            self._client = None
            was_ready = self.ready
            if self.connected or self.ready:
                self.connected = self.ready = False
                self.handler.on_disconnected()
            if self._stop.is_set():
                break
            if renewed:
                attempt = 0
                continue
            attempt = 0 if was_ready else attempt + 1
            delay = self._backoff(attempt)
            log.warning(
                "IoT Hub connection down; reconnecting",
                reason=self._refused or self.last_error,
                retry_in_s=round(delay, 1),
            )
            self._stop.wait(delay)

    def _serve(self, client: mqtt.Client, renew_at: float) -> bool:
        """Run one connection; True if it ended for a token renewal."""
        renewing_since: float | None = None
        busy = False
        while not self._stop.is_set():
            rc = client.loop(timeout=0.0 if busy else 0.05)
            if rc != mqtt.MQTT_ERR_SUCCESS or self._refused or self._lost:
                if not self._refused:
                    self.last_error = self.last_error or f"connection lost ({mqtt.error_string(rc)})"
                return False
            busy = self._drain_submissions(client)
            if self.ready:  # while renewing: only commit acknowledgements, publish nothing new
                busy = self.handler.pump(self, publish=renewing_since is None) or busy
            if self.connected and time.monotonic() >= renew_at:
                if renewing_since is None:
                    renewing_since = time.monotonic()
                    log.info("SAS token near expiry: reconnecting with a new one", device_id=self.device_id)
                if self.handler.in_flight() == 0 or time.monotonic() - renewing_since > 10:
                    client.disconnect()
                    client.loop(timeout=0.1)
                    return True
        if self.connected:
            client.disconnect()
            client.loop(timeout=0.1)
        return False

    def _drain_submissions(self, client: mqtt.Client) -> bool:
        did = False
        while True:
            try:
                conn_no, mid = self._acks.get_nowait()
            except queue.Empty:
                break
            if conn_no == self.connects and self.connected:  # a message of an older connection is redelivered
                client.ack(mid, 1)
                did = True
        while self.connected:
            try:
                topic, payload, qos = self._outq.get_nowait()
            except queue.Empty:
                break
            client.publish(topic, payload, qos=qos)
            did = True
        return did

    # ---------------------------------------------------------------- paho callbacks (network thread)
    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: mqtt.ReasonCode, props: object
    ) -> None:
        if rc.is_failure:
            reason = f"connection refused: {rc}"
            if self.cfg.auth == "sas" and rc.value in (4, 5, 134, 135):
                reason += "; the SAS token was rejected (wrong device key, or the system clock is off)"
                self._last_clock_log = 0.0
                self._check_clock()
            self._refused = reason
            self.last_error = reason
            log.error("IoT Hub refused the connection", device_id=self.device_id, reason=reason)
            return
        self.connected = True
        self.connects += 1
        self.connected_since = self.time_fn()
        self.last_error = None
        # drop stale submissions from a previous connection (twin requests etc. are re-issued on ready)
        while not self._outq.empty():
            try:
                self._outq.get_nowait()
            except queue.Empty:
                break
        log.info(
            "connected to IoT Hub", host=self.host, device_id=self.device_id, auth=self.cfg.auth, connects=self.connects
        )
        result, mid = client.subscribe(subscriptions(self.device_id))
        self._sub_mid = mid

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, codes: list, props: object) -> None:
        if mid != self._sub_mid:
            return
        failed = [str(c) for c in codes if getattr(c, "is_failure", False)]
        if failed:
            self._refused = f"subscription refused: {failed}"
            log.error("IoT Hub refused a subscription", codes=failed)
            return
        self.ready = True
        self.handler.on_ready()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if msg.qos == 0:
            self.handler.on_message(msg.topic, bytes(msg.payload))
            return
        conn_no, mid = self.connects, msg.mid
        self.handler.on_message(msg.topic, bytes(msg.payload), lambda: self._acks.put((conn_no, mid)))

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, rc: mqtt.ReasonCode, props: object) -> None:
        self.handler.on_ack(mid)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: mqtt.ReasonCode, props: object
    ) -> None:
        if self.connected:
            log.warning("disconnected from IoT Hub", reason=str(rc))
        self._lost = True
