"""A faithful stand-in for Azure IoT Hub's MQTT device surface and DPS's MQTT registration flow.

It follows Microsoft's documentation ("Communicate with an IoT hub using MQTT", "device twins", "direct
methods", "C2D messaging", "DPS MQTT support"), not our client: CONNECT needs client id = device id, the
``{hub}/{device}/?api-version=`` username and a valid SAS token (signature over the URL-encoded resource
URI + "\\n" + expiry; expired -> refused, and a live connection is closed when its token expires) or an
X.509 client certificate whose CN is the device id. Topics are scoped to the connection's device;
undocumented topics, QoS 2 publishes and over-size messages close the connection, as the hub does.

Tests act as the service through the thread-safe methods of :class:`FakeHub` (set desired properties,
invoke methods, send C2D, read telemetry, inject 429s and disconnects), or through the service REST API
(twin read/update, query, direct methods; :mod:`testsupport.fakehub.service`) that ``appliance central`` and
Microsoft's ``azure-iot-hub`` SDK call. :meth:`FakeHub.add_fault` drops, delays or throttles chosen MQTT
messages (by topic pattern and count). The server runs its own asyncio loop in a background thread.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import fnmatch
import hashlib
import hmac
import itertools
import json
import ssl
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

from testsupport.fakehub import mqtt

MAX_D2C_BYTES = 256 * 1024
MAX_TWIN_SECTION_BYTES = 32 * 1024
MAX_TWIN_DEPTH = 10
MAX_METHOD_PAYLOAD = 128 * 1024
MAX_C2D_QUEUE = 50
MAX_SUBSCRIPTIONS = 5
MAX_KEEPALIVE = 1177
# CONNACK return codes (MQTT 3.1.1)
RC_OK, RC_BAD_PROTOCOL, RC_BAD_ID, RC_UNAVAILABLE, RC_BAD_CREDENTIALS, RC_NOT_AUTHORIZED = 0, 1, 2, 3, 4, 5


@dataclass
class Device:
    device_id: str
    key: str | None = None  # base64 symmetric key (SAS); None = X.509 only
    x509: bool = False
    desired: dict[str, Any] = field(default_factory=dict)
    desired_version: int = 1
    reported: dict[str, Any] = field(default_factory=dict)
    reported_version: int = 1
    reported_patches: list[dict[str, Any]] = field(default_factory=list)  # every accepted patch, in order
    c2d_queue: list[dict[str, Any]] = field(default_factory=list)
    tags: dict[str, Any] = field(default_factory=dict)
    twin_version: int = 1  # every change of tags, desired or reported; the service etag is derived from it
    desired_updated: float = field(default_factory=time.time)
    reported_updated: float = field(default_factory=time.time)

    @property
    def etag(self) -> str:
        """The twin's etag as the service shows it (base64 of a 64-bit counter, e.g. ``AAAAAAAAAAE=``)."""
        return base64.b64encode(struct.pack(">Q", self.twin_version)).decode()


@dataclass
class Fault:
    """A fault the hub applies to chosen MQTT PUBLISH packets (see :meth:`FakeHub.add_fault`)."""

    topic: (
        str  # fnmatch pattern on the full topic, e.g. "$iothub/twin/res/*" or "$iothub/twin/PATCH/properties/desired/*"
    )
    direction: str  # "to_device" (hub -> device) or "from_device" (device -> hub)
    action: str  # "drop" | "delay" | "throttle"
    count: int | None = 1  # how many matching messages it applies to; None = all
    delay_s: float = 0.0
    device_id: str | None = None
    retry_after_s: int = 1  # throttle: DPS answers 429 with this retry-after
    hits: list[str] = field(default_factory=list)  # topics it was applied to

    def take(self, device_id: str | None, topic: str, direction: str) -> bool:
        if direction != self.direction or (self.device_id is not None and device_id != self.device_id):
            return False
        if (self.count is not None and len(self.hits) >= self.count) or not fnmatch.fnmatchcase(topic, self.topic):
            return False
        self.hits.append(topic)
        return True


SYSTEM_PREFIX = "iothub-"  # system properties: the hub stamps them; a device cannot set or forge one


@dataclass
class Telemetry:
    """One device-to-cloud message as the hub keeps it: ``props`` are the device's application properties (and
    the ``$.``-prefixed system properties it may set: message id, content type ...); ``system`` are the
    properties the hub stamps from the connection (``iothub-connection-device-id``,
    ``iothub-connection-auth-method``, ``iothub-enqueuedtime``), as Microsoft's "Create and read IoT Hub
    messages" lists them."""

    device_id: str
    topic: str
    props: dict[str, str]
    body: bytes
    received_at: float
    connection: int
    system: dict[str, str] = field(default_factory=dict)

    def event(self) -> dict[str, Any]:
        """The message as a reader of the hub's Event Hubs-compatible endpoint gets it (one JSON line of an
        export): ``{"system_properties": {...}, "properties": {...}, "body": <text, or "body_b64">}``."""
        doc: dict[str, Any] = {"system_properties": dict(self.system), "properties": dict(self.props)}
        try:
            doc["body"] = self.body.decode("utf-8")
        except UnicodeDecodeError:
            doc["body_b64"] = base64.b64encode(self.body).decode("ascii")
        return doc


@dataclass
class Event:
    """Something the hub did to or saw from a device (connect refused, disconnected and why ...)."""

    device_id: str | None
    what: str
    detail: str
    at: float


def parse_props(bag: str) -> dict[str, str]:
    props: dict[str, str] = {}
    for part in bag.split("&"):
        if not part:
            continue
        k, _, v = part.partition("=")
        props[unquote(k)] = unquote(v)
    return props


def _depth(obj: Any) -> int:
    if isinstance(obj, dict):
        return 1 + max((_depth(v) for v in obj.values()), default=0)
    return 0


def _twin_size(obj: Any) -> int:
    """A twin section's size as IoT Hub documents it: keys' and string values' characters (Unicode control
    characters not counted), numbers 8, booleans 4, objects the sum of their members; $-properties excluded."""

    def chars(text: str) -> int:
        return sum(1 for ch in text if not (ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F))

    if isinstance(obj, dict):
        return sum(chars(k) + _twin_size(v) for k, v in obj.items() if not k.startswith("$"))
    if isinstance(obj, list):
        return sum(_twin_size(v) for v in obj)
    if isinstance(obj, bool):
        return 4
    if isinstance(obj, (int, float)):
        return 8
    return chars(obj) if isinstance(obj, str) else 0


def _bad_twin_keys(obj: Any) -> list[str]:
    bad = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not k or len(k.encode()) > 1024 or any(c in k for c in ".$ ") or any(ord(c) < 32 for c in k):
                bad.append(k)
            bad += _bad_twin_keys(v)
    return bad


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            _merge(target[k], v)
        else:
            target[k] = copy.deepcopy(v)


def verify_sas(
    token: str,
    expected_resource: str | tuple[str, ...],
    key_b64: str,
    now: float,
    policy: str | None = None,
    *,
    policy_optional: bool = False,
) -> tuple[bool, str, int]:
    """(ok, reason, expiry) for a ``SharedAccessSignature`` per Microsoft's "Control access with SAS" doc.

    ``expected_resource``: the ``sr`` the token must name (one of several when a tuple). ``policy``: the
    ``skn`` it must carry; with ``policy_optional`` a token without ``skn`` is accepted too (DPS does: the
    ``skn=registration`` field is optional, Azure SDK for C ``az_iot_provisioning_client_sas_get_password``
    takes an empty key name), but a different ``skn`` is still refused.
    """
    resources = (expected_resource,) if isinstance(expected_resource, str) else expected_resource
    prefix = "SharedAccessSignature "
    if not token.startswith(prefix):
        return False, "password is not a SharedAccessSignature", 0
    fields: dict[str, str] = {}
    for part in token[len(prefix) :].split("&"):
        k, sep, v = part.partition("=")
        if not sep:
            return False, f"malformed SAS field {part!r}", 0
        fields[k] = v
    for required in ("sr", "sig", "se"):
        if required not in fields:
            return False, f"SAS token lacks {required}", 0
    if unquote(fields["sr"]).lower() not in {r.lower() for r in resources}:
        return False, f"SAS resource {unquote(fields['sr'])!r} is not {resources[0]!r}", 0
    if (
        policy is not None
        and not (policy_optional and "skn" not in fields)
        and unquote(fields.get("skn", "")) != policy
    ):
        return False, f"SAS policy must be {policy!r}", 0
    try:
        expiry = int(fields["se"])
    except ValueError:
        return False, "SAS expiry is not an integer", 0
    to_sign = f"{fields['sr']}\n{fields['se']}".encode()
    good = base64.b64encode(hmac.new(base64.b64decode(key_b64), to_sign, hashlib.sha256).digest()).decode()
    if not hmac.compare_digest(unquote(fields["sig"]), good):
        return False, "SAS signature does not match", expiry
    if expiry <= now:
        return False, f"SAS token expired at {expiry} (hub time {int(now)})", expiry
    return True, "", expiry


class _Conn:
    ids = itertools.count(1)

    def __init__(self, hub: FakeHub, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.hub, self.reader, self.writer = hub, reader, writer
        self.number = next(self.ids)
        self.device_id: str | None = None
        self.auth_method = "sas"  # or "x509Certificate", as iothub-connection-auth-method says
        self.kind = "hub"
        self.subs: dict[str, int] = {}
        self.pids = itertools.count(1)
        self.c2d_inflight: dict[int, dict[str, Any]] = {}
        self.closed = False
        self.expiry_handle: asyncio.TimerHandle | None = None
        self.d2c_count = 0

    def send(self, data: bytes) -> None:
        if not self.closed:
            self.writer.write(data)

    def next_pid(self) -> int:
        pid = next(self.pids) % 65535 or next(self.pids)
        return pid

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.hub._event(self.device_id, "disconnected", reason)
        if self.expiry_handle:
            self.expiry_handle.cancel()
        with contextlib.suppress(Exception):
            self.writer.close()


class FakeHub:
    """IoT Hub (+ DPS) over MQTT/TLS on 127.0.0.1; see the module docstring."""

    def __init__(
        self,
        hostname: str = "fakehub.azure-devices.net",
        certfile: str | None = None,
        keyfile: str | None = None,
        client_ca: str | None = None,
        port: int = 0,
        id_scope: str = "0ne00000001",
        clock_skew_s: float = 0.0,
    ):
        self.hostname, self.id_scope = hostname, id_scope
        self.certfile, self.keyfile, self.client_ca = certfile, keyfile, client_ca
        self.port = port
        self.clock_skew_s = clock_skew_s
        self.devices: dict[str, Device] = {}
        self.telemetry: list[Telemetry] = []
        self.events: list[Event] = []
        self.c2d_completed: list[dict[str, Any]] = []
        self.lock = threading.RLock()
        self.twin_status_queue: dict[str, list[int]] = {}
        self.cut_after_d2c: dict[str, tuple[int, bool]] = {}  # device -> (n, capture the last one)
        self.puback_delay_s = 0.0
        self.dps_outcomes: dict[str, tuple[str, int, str]] = {}  # registration id -> (status, errorCode, message)
        self.faults: list[Fault] = []
        self.routes: list[tuple[Any, Any]] = []  # (StorageEndpoint, condition on the application properties)
        # service API (HTTPS, testsupport.fakehub.service): shared access policies name -> base64 key
        self.service_policies: dict[str, str] = {
            "iothubowner": base64.b64encode(hashlib.sha256(uuid.uuid4().bytes).digest()).decode(),
            "service": base64.b64encode(hashlib.sha256(uuid.uuid4().bytes).digest()).decode(),
        }
        self.service_port = 0
        self._service: Any = None
        self._conns: dict[str, _Conn] = {}
        self._all_conns: set[_Conn] = set()
        self._method_waiters: dict[str, asyncio.Future] = {}
        self._rids = itertools.count(1)
        # DPS
        self.group_keys: dict[str, str] = {}  # enrollment group name -> key
        self.individual: dict[str, dict[str, Any]] = {}  # registration id -> {"key"| "x509"}
        self.dps_assigning_polls = 1
        self.dps_retry_after_s = 1
        self.dps_operations: dict[str, dict[str, Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.certfile, self.keyfile)
        if self.client_ca:
            ctx.load_verify_locations(self.client_ca)
            ctx.verify_mode = ssl.CERT_OPTIONAL  # SAS devices present no certificate
        return ctx

    def start(self) -> int:
        """Serve on 127.0.0.1 (same port as before after a stop); returns the port."""
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)

            async def boot() -> None:
                self._server = await asyncio.start_server(
                    self._handle,
                    "127.0.0.1",
                    self.port,
                    ssl=self._ssl() if self.certfile else None,
                    reuse_address=True,
                )
                self.port = self._server.sockets[0].getsockname()[1]
                ready.set()

            self._loop.run_until_complete(boot())
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=run, name="fakehub", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake hub did not start")
        if self.certfile and self._service is None:
            from testsupport.fakehub.service import ServiceApi

            self._service = ServiceApi(self, self.service_port)
            self.service_port = self._service.start()
        return self.port

    def stop(self) -> None:
        """Kill the hub abruptly: every connection is dropped (no DISCONNECT), state is kept for a restart."""
        loop = self._loop
        if loop is None:
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for c in list(self._all_conns):
                c.close("hub stopped")
                c.writer.transport.abort()
            await self._server.wait_closed()

        if self._service is not None:
            self._service.stop()
            self._service = None
        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop = None

    def __enter__(self) -> FakeHub:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def now(self) -> float:
        return time.time() + self.clock_skew_s

    def _call(self, coro_or_fn: Any, timeout: float = 10) -> Any:
        assert self._loop is not None, "hub not running"
        if asyncio.iscoroutine(coro_or_fn):
            return asyncio.run_coroutine_threadsafe(coro_or_fn, self._loop).result(timeout)

        async def wrap() -> Any:
            return coro_or_fn()

        return asyncio.run_coroutine_threadsafe(wrap(), self._loop).result(timeout)

    def _event(self, device_id: str | None, what: str, detail: str) -> None:
        with self.lock:
            self.events.append(Event(device_id, what, detail, time.time()))

    # ------------------------------------------------------------------ service-side API
    def add_device(self, device_id: str, key: str | None = None, x509: bool = False) -> Device:
        with self.lock:
            dev = self.devices.setdefault(device_id, Device(device_id))
            dev.key, dev.x509 = key, x509
            return dev

    def is_connected(self, device_id: str) -> bool:
        with self.lock:
            c = self._conns.get(device_id)
            return c is not None and not c.closed

    def messages(self, device_id: str | None = None, type_: str | None = None) -> list[Telemetry]:
        with self.lock:
            return [
                t
                for t in self.telemetry
                if (device_id is None or t.device_id == device_id) and (type_ is None or t.props.get("type") == type_)
            ]

    def events_for(self, device_id: str | None, what: str | None = None) -> list[Event]:
        with self.lock:
            return [e for e in self.events if e.device_id == device_id and (what is None or e.what == what)]

    def service_connection_string(self, policy: str = "iothubowner") -> str:
        """``HostName=127.0.0.1:<service port>;SharedAccessKeyName=..;SharedAccessKey=..`` for the service API.

        The host is where this hub listens (the real one is ``<hub>.azure-devices.net``); service SAS tokens
        may name either as their resource (``sr``).
        """
        key = self.service_policies[policy]
        return f"HostName=127.0.0.1:{self.service_port};SharedAccessKeyName={policy};SharedAccessKey={key}"

    def add_storage_route(self, endpoint: Any, condition: Any = None) -> None:
        """Route device-to-cloud messages to a storage endpoint (:class:`testsupport.fakehub.routing.StorageEndpoint`),
        as an IoT Hub route does; ``condition(application_properties) -> bool`` plays the route's query (None: all)."""
        with self.lock:
            self.routes.append((endpoint, condition))

    def _route(self, t: Telemetry, auth_method: str) -> None:
        from testsupport.fakehub.routing import record

        with self.lock:
            routes = list(self.routes)
        for endpoint, condition in routes:
            if condition is None or condition(dict(t.props)):
                endpoint.route(record(t.device_id, t.props, t.body, t.received_at, auth_method))

    def set_tags(self, device_id: str, tags: dict[str, Any]) -> None:
        """Service side: merge ``tags`` into the device twin's tags (null deletes)."""
        with self.lock:
            d = self.devices[device_id]
            _merge(d.tags, tags)
            d.twin_version += 1

    def add_fault(
        self,
        topic: str,
        action: str,
        *,
        direction: str = "to_device",
        count: int | None = 1,
        delay_s: float = 0.0,
        device_id: str | None = None,
        retry_after_s: int = 1,
    ) -> Fault:
        """Drop, delay or throttle the next ``count`` MQTT PUBLISHes whose topic matches ``topic`` (fnmatch).

        ``direction`` "to_device": what the hub sends (a desired patch, a twin response, a method request, C2D);
        "from_device": what a device publishes (the hub never sees a dropped one: no PUBACK, no effect).
        ``action`` "drop" loses the message; "delay" handles it ``delay_s`` later; "throttle" (from_device
        requests only: ``$iothub/twin/...`` and ``$dps/...``) answers 429 as the throttled service does, DPS
        with ``retry-after``. Returns the :class:`Fault`; its ``hits`` lists the topics it applied to.
        Raises ValueError for a combination the hub cannot apply.
        """
        if direction not in ("to_device", "from_device") or action not in ("drop", "delay", "throttle"):
            raise ValueError(f"unknown fault {direction}/{action}")
        if action == "throttle" and direction != "from_device":
            raise ValueError("throttle applies to device requests (direction='from_device')")
        if action == "delay" and delay_s <= 0:
            raise ValueError("delay needs delay_s > 0")
        f = Fault(topic, direction, action, count, delay_s, device_id, retry_after_s)
        with self.lock:
            self.faults.append(f)
        return f

    def _fault(self, device_id: str | None, topic: str, direction: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.take(device_id, topic, direction):
                    self._event(device_id, f"fault-{f.action}", topic)
                    return f
        return None

    def _publish_to(self, c: _Conn, topic: str, body: bytes, qos: int = 0, pid: int | None = None) -> None:
        """Send a PUBLISH to a device, through the faults configured for ``to_device``."""
        data = mqtt.publish(topic, body, qos=qos, pid=pid)
        f = self._fault(c.device_id, topic, "to_device")
        if f is None:
            c.send(data)
        elif f.action == "delay":
            asyncio.get_running_loop().call_later(f.delay_s, c.send, data)

    def twin(self, device_id: str) -> dict[str, Any]:
        with self.lock:
            d = self.devices[device_id]
            return copy.deepcopy(
                {
                    "desired": {**d.desired, "$version": d.desired_version},
                    "reported": {**d.reported, "$version": d.reported_version},
                }
            )

    def reported_patches(self, device_id: str) -> list[dict[str, Any]]:
        """Every reported-properties patch the hub accepted from ``device_id``, oldest first (a test's view of
        the order a device reported a state machine in)."""
        with self.lock:
            return copy.deepcopy(self.devices[device_id].reported_patches)

    def update_desired(self, device_id: str, patch: dict[str, Any]) -> int:
        """Service-side desired-property update; delivered as a patch only if the device is connected now."""
        with self.lock:
            d = self.devices[device_id]
            _merge(d.desired, patch)
            d.desired_version += 1
            d.twin_version += 1
            d.desired_updated = time.time()
            version = d.desired_version
        body = json.dumps({**patch, "$version": version}).encode()
        if self._loop is not None:
            self._call(lambda: self._push_desired(device_id, body, version))
        return version

    def send_raw_desired(self, device_id: str, body: bytes, version: int | None = None) -> int:
        """Bad-input injection: deliver an arbitrary desired-patch body (the real hub validates, a proxy may not).

        ``version`` None takes the hub's next desired ``$version`` (the document itself is not changed).
        """
        if version is None:
            with self.lock:
                self.devices[device_id].desired_version += 1
                version = self.devices[device_id].desired_version
        self._call(lambda: self._push_desired(device_id, body, version))
        return version

    def _push_desired(self, device_id: str, body: bytes, version: int) -> None:
        c = self._conns.get(device_id)
        if c and not c.closed and self._subscribed(c, "$iothub/twin/PATCH/properties/desired/"):
            self._publish_to(c, f"$iothub/twin/PATCH/properties/desired/?$version={version}", body)

    def invoke_method(
        self, device_id: str, name: str, payload: Any = None, timeout: float = 30.0, raw: bytes | None = None
    ) -> tuple[int, Any]:
        """Direct method call: (status, parsed response) — 404 offline device, 504 timeout, as the service sees."""
        if not 5 <= timeout <= 300:
            raise ValueError("method response timeout must be 5..300 s (as in the service API)")
        body = raw if raw is not None else json.dumps(payload).encode()
        if len(body) > MAX_METHOD_PAYLOAD:
            return 400, {"message": "method payload over 128 KB"}

        async def call() -> tuple[int, Any]:
            c = self._conns.get(device_id)
            if c is None or c.closed or not self._subscribed(c, "$iothub/methods/POST/"):
                return 404, {"errorCode": 404103, "message": "device is not online"}
            rid = format(next(self._rids), "x")
            fut = asyncio.get_running_loop().create_future()
            self._method_waiters[rid] = fut
            self._publish_to(c, f"$iothub/methods/POST/{name}/?$rid={rid}", body)
            try:
                status, resp = await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                return 504, {"errorCode": 504101, "message": "timed out waiting for the device"}
            finally:
                self._method_waiters.pop(rid, None)
            try:
                return status, json.loads(resp) if resp else None
            except ValueError:
                return status, resp

        return self._call(call(), timeout + 5)

    def send_c2d(self, device_id: str, body: bytes, props: dict[str, str] | None = None) -> str:
        """Queue a cloud-to-device message (max 50 queued, 64 KB) and deliver it if the device listens."""
        if len(body) > 64 * 1024:
            raise ValueError("C2D messages are limited to 64 KB")
        mid = str(uuid.uuid4())
        msg = {
            "mid": mid,
            "body": body,
            "props": {"$.mid": mid, "$.to": f"/devices/{device_id}/messages/deviceBound", **(props or {})},
        }
        with self.lock:
            q = self.devices[device_id].c2d_queue
            if len(q) >= MAX_C2D_QUEUE:
                raise RuntimeError("device queue full (50 messages)")
            q.append(msg)
        if self._loop is not None:
            self._call(lambda: self._deliver_c2d(device_id))
        return mid

    def send_raw_c2d(self, device_id: str, body: bytes, props: dict[str, str] | None = None) -> str:
        """Bad-input injection without the 64 KB check (what a misbehaving path could deliver)."""
        mid = str(uuid.uuid4())
        with self.lock:
            self.devices[device_id].c2d_queue.append(
                {"mid": mid, "body": body, "props": {"$.mid": mid, **(props or {})}}
            )
        self._call(lambda: self._deliver_c2d(device_id))
        return mid

    def disconnect_device(self, device_id: str, reason: str = "forced by test") -> None:
        def go() -> None:
            c = self._conns.get(device_id)
            if c:
                c.close(reason)
                c.writer.transport.abort()

        self._call(go)

    def inject_twin_status(self, device_id: str, statuses: list[int]) -> None:
        """The next twin requests from this device get these status codes (e.g. 429 throttling)."""
        with self.lock:
            self.twin_status_queue.setdefault(device_id, []).extend(statuses)

    def cut_after(self, device_id: str, n: int, capture_last: bool = False) -> None:
        """Drop the connection when the n-th next D2C message arrives, before its PUBACK (cut mid-publish)."""
        with self.lock:
            self.cut_after_d2c[device_id] = (n, capture_last)

    # DPS service side
    def add_enrollment_group(self, name: str, group_key: str) -> None:
        self.group_keys[name] = group_key

    def add_individual_enrollment(self, registration_id: str, key: str | None = None, x509: bool = False) -> None:
        self.individual[registration_id] = {"key": key, "x509": x509}

    # ------------------------------------------------------------------ protocol
    @staticmethod
    def _subscribed(c: _Conn, prefix: str) -> bool:
        return any(f.startswith(prefix) or prefix.startswith(f.rstrip("#")) for f in c.subs)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        c = _Conn(self, reader, writer)
        self._all_conns.add(c)
        try:
            await self._serve(c)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError):
            c.close("connection lost")
        except mqtt.ProtocolError as exc:
            c.close(f"protocol error: {exc}")
        finally:
            c.close("connection ended")
            self._all_conns.discard(c)
            if c.device_id and self._conns.get(c.device_id) is c:
                del self._conns[c.device_id]
                self._requeue_c2d(c)

    def _refuse(self, c: _Conn, rc: int, device_id: str | None, reason: str) -> None:
        self._event(device_id, "refused", reason)
        c.send(mqtt.connack(False, rc))
        c.close(f"refused: {reason}")

    def _authenticate(self, c: _Conn, cn: mqtt.Connect) -> bool:
        if cn.protocol != "MQTT" or cn.level != 4:
            self._refuse(c, RC_BAD_PROTOCOL, None, f"only MQTT 3.1.1 is supported (got {cn.protocol} {cn.level})")
            return False
        if cn.keepalive > MAX_KEEPALIVE:
            # The hub caps the keep-alive; it does not refuse. Record it so tests can see.
            self._event(cn.client_id, "keepalive-capped", str(cn.keepalive))
        user = cn.username or ""
        peer = c.writer.get_extra_info("peercert")
        cert_cn = None
        if peer:
            for rdn in peer.get("subject", ()):
                for k, v in rdn:
                    if k == "commonName":
                        cert_cn = v
        if "/registrations/" in user:
            return self._authenticate_dps(c, cn, user, cert_cn)
        parts = user.split("/", 2)
        if len(parts) != 3 or not parts[2].startswith("?") or "api-version=" not in parts[2]:
            self._refuse(
                c, RC_BAD_CREDENTIALS, cn.client_id, f"username {user!r} is not {{hub}}/{{device}}/?api-version=..."
            )
            return False
        host, dev_id = parts[0], parts[1]
        if host.lower() != self.hostname.lower():
            self._refuse(c, RC_BAD_CREDENTIALS, cn.client_id, f"username names hub {host!r}, this is {self.hostname!r}")
            return False
        if dev_id != cn.client_id:
            self._refuse(c, RC_BAD_ID, cn.client_id, "client id must equal the device id in the username")
            return False
        with self.lock:
            dev = self.devices.get(dev_id)
        if dev is None:
            self._refuse(c, RC_NOT_AUTHORIZED, dev_id, "device not registered")
            return False
        if cn.password is not None:
            if not dev.key:
                self._refuse(c, RC_NOT_AUTHORIZED, dev_id, "device has no symmetric key")
                return False
            ok, reason, expiry = verify_sas(cn.password, f"{self.hostname}/devices/{dev_id}", dev.key, self.now())
            if not ok:
                self._refuse(c, RC_NOT_AUTHORIZED, dev_id, reason)
                return False
            delay = max(0.0, expiry - self.now())
            c.expiry_handle = asyncio.get_running_loop().call_later(delay, self._expire, c)
        else:
            if not (dev.x509 and cert_cn == dev_id):
                self._refuse(
                    c,
                    RC_NOT_AUTHORIZED,
                    dev_id,
                    f"no password and no client certificate for {dev_id!r} (CN={cert_cn!r})",
                )
                return False
            c.auth_method = "x509Certificate"
        c.device_id = dev_id
        return True

    def _authenticate_dps(self, c: _Conn, cn: mqtt.Connect, user: str, cert_cn: str | None) -> bool:
        scope, _, rest = user.partition("/registrations/")
        reg_id, _, version = rest.partition("/")
        if scope != self.id_scope or reg_id != cn.client_id or not version.startswith("api-version="):
            self._refuse(c, RC_BAD_CREDENTIALS, cn.client_id, f"bad DPS username {user!r}")
            return False
        c.kind = "dps"
        if cn.password is not None:
            keys = []
            ind = self.individual.get(reg_id)
            if ind and ind.get("key"):
                keys.append(ind["key"])
            for gk in self.group_keys.values():
                keys.append(
                    base64.b64encode(hmac.new(base64.b64decode(gk), reg_id.encode(), hashlib.sha256).digest()).decode()
                )
            for key in keys:
                ok, reason, _ = verify_sas(
                    cn.password,
                    f"{self.id_scope}/registrations/{reg_id}",
                    key,
                    self.now(),
                    "registration",
                    policy_optional=True,
                )
                if ok:
                    c.device_id = reg_id
                    c.dps_key = key  # type: ignore[attr-defined]
                    return True
            self._refuse(
                c, RC_NOT_AUTHORIZED, reg_id, f"DPS attestation failed ({reason if keys else 'no enrollment'})"
            )
            return False
        ind = self.individual.get(reg_id)
        if ind and ind.get("x509") and cert_cn == reg_id:
            c.device_id = reg_id
            c.dps_key = None  # type: ignore[attr-defined]
            return True
        self._refuse(c, RC_NOT_AUTHORIZED, reg_id, "DPS X.509 attestation failed")
        return False

    def _expire(self, c: _Conn) -> None:
        self._event(c.device_id, "token-expired", "401003 IotHubUnauthorized: SAS token expired")
        c.close("SAS token expired")
        c.writer.transport.abort()

    async def _serve(self, c: _Conn) -> None:
        first = await asyncio.wait_for(mqtt.read_packet(c.reader), 30)
        if first.type != mqtt.CONNECT:
            raise mqtt.ProtocolError("first packet must be CONNECT")
        cn = mqtt.parse_connect(first)
        if not self._authenticate(c, cn):
            await c.writer.drain()
            return
        old = self._conns.get(c.device_id)  # one connection per device: the new one wins (400027)
        if old is not None and old is not c:
            old.close("400027 ConnectionForcefullyClosedOnNewConnection")
            old.writer.transport.abort()
            self._requeue_c2d(old)
        self._conns[c.device_id] = c
        session_present = False
        if c.kind == "hub" and cn.clean_session:
            with self.lock:
                self.devices[c.device_id].c2d_queue.clear()  # CleanSession=1 drops queued C2D
        c.send(mqtt.connack(session_present, RC_OK))
        self._event(c.device_id, "connected", f"conn={c.number} kind={c.kind} clean={cn.clean_session}")
        keepalive = min(cn.keepalive, MAX_KEEPALIVE)
        timeout = keepalive * 1.5 if keepalive else None
        while not c.closed:
            try:
                p = await asyncio.wait_for(mqtt.read_packet(c.reader), timeout)
            except asyncio.TimeoutError:
                c.close("keep-alive timeout")
                return
            await self._dispatch(c, p)
            await c.writer.drain()

    async def _dispatch(self, c: _Conn, p: mqtt.Packet) -> None:
        if p.type == mqtt.PINGREQ:
            c.send(mqtt.pingresp())
        elif p.type == mqtt.DISCONNECT:
            c.close("client disconnected")
        elif p.type == mqtt.SUBSCRIBE:
            pid, subs = mqtt.parse_subscribe(p)
            codes = []
            for topic, qos in subs:
                if not self._allowed_filter(c, topic):
                    c.close(f"subscription to undocumented topic {topic!r}")
                    return
                c.subs[topic] = min(qos, 1)  # QoS 2 is granted as 1
                codes.append(min(qos, 1))
            if len(c.subs) > MAX_SUBSCRIPTIONS:
                c.close("more than 5 subscriptions")
                return
            c.send(mqtt.suback(pid, codes))
            if any(t.startswith(f"devices/{c.device_id}/messages/devicebound") for t, _ in subs):
                self._deliver_c2d(c.device_id)
        elif p.type == mqtt.UNSUBSCRIBE:
            pid, topics = mqtt.parse_unsubscribe(p)
            for t in topics:
                c.subs.pop(t, None)
            c.send(mqtt.unsuback(pid))
        elif p.type == mqtt.PUBACK:
            pid = mqtt.packet_id(p)
            msg = c.c2d_inflight.pop(pid, None)
            if msg is not None:
                with self.lock:
                    q = self.devices[c.device_id].c2d_queue
                    if msg in q:
                        q.remove(msg)
                    self.c2d_completed.append(msg)
        elif p.type == mqtt.PUBLISH:
            pub = mqtt.parse_publish(p)
            if pub.qos == 2:
                c.close("QoS 2 is not supported by IoT Hub")
                return
            fault = self._fault(c.device_id, pub.topic, "from_device")
            if fault is not None:
                if fault.action == "delay":
                    asyncio.get_running_loop().call_later(
                        fault.delay_s, lambda: asyncio.ensure_future(self._handle_publish(c, pub))
                    )
                elif fault.action == "throttle":
                    self._throttle(c, pub, fault)
                return  # dropped: as if lost on the way (no PUBACK, no effect)
            await self._handle_publish(c, pub)
        else:
            c.close(f"unsupported packet type {p.type}")

    def _throttle(self, c: _Conn, pub: mqtt.Publish, fault: Fault) -> None:
        """Answer a device request with 429, as the throttled hub (ThrottlingException 429001) or DPS does."""
        path, _, q = pub.topic.partition("/?")
        rid = parse_props(q).get("$rid", "")
        body = json.dumps({"errorCode": 429001, "message": "throttled (injected)"}).encode()
        if pub.qos == 1:
            c.send(mqtt.puback(pub.packet_id or 0))
        if pub.topic.startswith("$dps/"):
            self._publish_to(c, f"$dps/registrations/res/429/?$rid={rid}&retry-after={fault.retry_after_s}", body)
        elif pub.topic.startswith("$iothub/twin/"):
            self._twin_reply(c, 429, rid, body)
        else:
            c.close(f"throttle fault on a topic without a response: {pub.topic!r}")

    async def _handle_publish(self, c: _Conn, pub: mqtt.Publish) -> None:
        if c.closed:
            return
        if c.kind == "dps":
            await self._dps_publish(c, pub)
        else:
            await self._hub_publish(c, pub)

    def _allowed_filter(self, c: _Conn, topic: str) -> bool:
        if c.kind == "dps":
            return topic == "$dps/registrations/res/#"
        return topic in (
            f"devices/{c.device_id}/messages/devicebound/#",
            "$iothub/twin/res/#",
            "$iothub/twin/PATCH/properties/desired/#",
            "$iothub/methods/POST/#",
        )

    async def _hub_publish(self, c: _Conn, pub: mqtt.Publish) -> None:
        dev_id = c.device_id
        assert dev_id is not None
        events = f"devices/{dev_id}/messages/events/"
        if pub.topic.startswith(events) or pub.topic == events.rstrip("/"):
            await self._d2c(c, pub, pub.topic[len(events) :])
        elif pub.topic.startswith("$iothub/twin/"):
            self._twin(c, pub)
        elif pub.topic.startswith("$iothub/methods/res/"):
            status_s, _, q = pub.topic[len("$iothub/methods/res/") :].partition("/?")
            rid = parse_props(q).get("$rid")
            fut = self._method_waiters.get(rid or "")
            if fut is None or fut.done():
                self._event(dev_id, "method-response-unmatched", pub.topic)
            else:
                try:
                    status = int(status_s)
                except ValueError:
                    c.close(f"method response with non-numeric status {status_s!r}")
                    return
                fut.set_result((status, pub.payload))
            if pub.qos == 1:
                c.send(mqtt.puback(pub.packet_id or 0))
        else:
            c.close(f"publish to undocumented or foreign topic {pub.topic!r}")

    async def _d2c(self, c: _Conn, pub: mqtt.Publish, bag: str) -> None:
        # a device cannot set system properties: any iothub-* it sends is not kept, the hub stamps its own
        props = {k: v for k, v in parse_props(bag).items() if not k.lower().startswith(SYSTEM_PREFIX)}
        if pub.retain:
            props["mqtt-retain"] = "true"
        size = len(pub.payload) + sum(len(k) + len(v) for k, v in props.items())
        if size > MAX_D2C_BYTES:
            c.close(f"D2C message of {size} bytes is over 256 KB")
            return
        if len(props.get("$.mid", "")) > 128:
            c.close("message id over 128 characters")
            return
        c.d2c_count += 1
        with self.lock:
            cut = self.cut_after_d2c.get(c.device_id or "")
        if cut is not None and c.d2c_count >= cut[0]:
            with self.lock:
                del self.cut_after_d2c[c.device_id or ""]
                if cut[1]:
                    self.telemetry.append(self._stamped(c, pub, props))
            c.close("cut mid-publish by test")
            c.writer.transport.abort()
            return
        with self.lock:
            stamped = self._stamped(c, pub, props)
            self.telemetry.append(stamped)
        self._route(stamped, c.auth_method)
        if pub.qos == 1:
            if self.puback_delay_s:
                await asyncio.sleep(self.puback_delay_s)
            c.send(mqtt.puback(pub.packet_id or 0))

    @staticmethod
    def _stamped(c: _Conn, pub: mqtt.Publish, props: dict[str, str]) -> Telemetry:
        """The message with the system properties the hub derives from the authenticated connection."""
        at = time.time()
        system = {
            "iothub-connection-device-id": c.device_id or "",
            "iothub-connection-auth-method": json.dumps({"scope": "device", "type": c.auth_method, "issuer": "iothub"}),
            "iothub-enqueuedtime": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at))
            + f".{int(at * 1000) % 1000:03d}Z",
        }
        return Telemetry(c.device_id or "", pub.topic, props, pub.payload, at, c.number, system)

    def _twin_reply(self, c: _Conn, status: int, rid: str, body: bytes = b"", version: int | None = None) -> None:
        topic = f"$iothub/twin/res/{status}/?$rid={rid}" + (f"&$version={version}" if version is not None else "")
        self._publish_to(c, topic, body)

    def _twin(self, c: _Conn, pub: mqtt.Publish) -> None:
        path, _, q = pub.topic.partition("/?")
        rid = parse_props(q).get("$rid")
        if pub.qos == 1:
            c.send(mqtt.puback(pub.packet_id or 0))
        if not rid:
            c.close("twin request without $rid")
            return
        with self.lock:
            queued = self.twin_status_queue.get(c.device_id or "")
            injected = queued.pop(0) if queued else None
        if injected is not None:
            self._twin_reply(
                c, injected, rid, json.dumps({"errorCode": injected * 1000 + 1, "message": "injected"}).encode()
            )
            return
        dev = self.devices[c.device_id or ""]
        if path == "$iothub/twin/GET":
            self._twin_reply(c, 200, rid, json.dumps(self.twin(dev.device_id)).encode())
        elif path == "$iothub/twin/PATCH/properties/reported":
            try:
                patch = json.loads(pub.payload)
                if not isinstance(patch, dict):
                    raise ValueError("reported patch must be a JSON object")
            except ValueError as exc:
                self._twin_reply(c, 400, rid, json.dumps({"message": f"invalid JSON: {exc}"}).encode())
                return
            with self.lock:
                merged = copy.deepcopy(dev.reported)
                _merge(merged, patch)
                bad = _bad_twin_keys(patch)
                too_big = _twin_size(merged) > MAX_TWIN_SECTION_BYTES
                too_deep = _depth(merged) > MAX_TWIN_DEPTH
                if bad or too_big or too_deep:
                    reason = f"bad keys {bad}" if bad else ("over 32 KB" if too_big else "deeper than 10")
                    self._twin_reply(c, 400, rid, json.dumps({"message": reason}).encode())
                    return
                dev.reported = merged
                dev.reported_patches.append(copy.deepcopy(patch))
                dev.reported_version += 1
                dev.twin_version += 1
                dev.reported_updated = time.time()
                version = dev.reported_version
            self._twin_reply(c, 204, rid, b"", version)
        else:
            c.close(f"unknown twin operation {pub.topic!r}")

    def _deliver_c2d(self, device_id: str) -> None:
        c = self._conns.get(device_id)
        if c is None or c.closed or not self._subscribed(c, f"devices/{device_id}/messages/devicebound/"):
            return
        with self.lock:
            pending = [m for m in self.devices[device_id].c2d_queue if m not in c.c2d_inflight.values()]
        for msg in pending:
            pid = c.next_pid()
            c.c2d_inflight[pid] = msg
            bag = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in msg["props"].items())
            self._publish_to(c, f"devices/{device_id}/messages/devicebound/{bag}", msg["body"], qos=1, pid=pid)

    def _requeue_c2d(self, c: _Conn) -> None:
        c.c2d_inflight.clear()  # unacknowledged C2D stays in the device queue for the next connection

    async def _dps_publish(self, c: _Conn, pub: mqtt.Publish) -> None:
        path, _, q = pub.topic.partition("/?")
        qp = parse_props(q)
        rid = qp.get("$rid", "")
        reply = lambda status, body, extra="": self._publish_to(  # noqa: E731
            c, f"$dps/registrations/res/{status}/?$rid={rid}{extra}", json.dumps(body).encode()
        )
        if path == "$dps/registrations/PUT/iotdps-register":
            try:
                req = json.loads(pub.payload)
                assert req["registrationId"] == c.device_id
            except (ValueError, KeyError, AssertionError, TypeError):
                reply(400, {"errorCode": 400004, "message": "registrationId missing or not the connected one"})
                return
            op = f"4.{uuid.uuid4().hex[:16]}.{uuid.uuid4()}"
            self.dps_operations[op] = {
                "reg": c.device_id,
                "polls": 0,
                "payload": req.get("payload"),
                "key": getattr(c, "dps_key", None),
            }
            reply(202, {"operationId": op, "status": "assigning"}, f"&retry-after={self.dps_retry_after_s}")
        elif path == "$dps/registrations/GET/iotdps-get-operationstatus":
            op = self.dps_operations.get(qp.get("operationId", ""))
            if op is None or op["reg"] != c.device_id:
                reply(404, {"errorCode": 404200, "message": "operation not found"})
                return
            op["polls"] += 1
            if op["polls"] <= self.dps_assigning_polls:
                reply(
                    202,
                    {"operationId": qp["operationId"], "status": "assigning"},
                    f"&retry-after={self.dps_retry_after_s}",
                )
                return
            outcome = self.dps_outcomes.get(op["reg"])
            if outcome is not None:  # the enrollment is disabled, or allocation failed: DPS says so with 200
                status, code, message = outcome
                reply(
                    200,
                    {
                        "operationId": qp["operationId"],
                        "status": status,
                        "registrationState": {
                            "registrationId": op["reg"],
                            "status": status,
                            "errorCode": code,
                            "errorMessage": message,
                        },
                    },
                )
                return
            key = op["key"]
            self.add_device(op["reg"], key=key, x509=key is None)
            ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            reply(
                200,
                {
                    "operationId": qp["operationId"],
                    "status": "assigned",
                    "registrationState": {
                        "registrationId": op["reg"],
                        "assignedHub": self.hostname,
                        "deviceId": op["reg"],
                        "status": "assigned",
                        "substatus": "initialAssignment",
                        "createdDateTimeUtc": ts,
                        "lastUpdatedDateTimeUtc": ts,
                        "etag": uuid.uuid4().hex,
                        "payload": {"received": op["payload"]} if op["payload"] is not None else None,
                    },
                },
            )
        else:
            c.close(f"unknown DPS topic {pub.topic!r}")
        if pub.qos == 1:
            c.send(mqtt.puback(pub.packet_id or 0))
