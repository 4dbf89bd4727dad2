"""The fake hub's service API: the part of IoT Hub's REST API (api-version 2021-04-12) that central tools use.

Documented by Microsoft as "IoT Hub service REST API": Twin - Get Device Twin (``GET /twins/{id}``), Update
Device Twin (``PATCH /twins/{id}``, ``If-Match`` etag), Replace Device Twin (``PUT /twins/{id}``), Query IoT Hub
(``POST /devices/query``, paged with ``x-ms-max-item-count`` / ``x-ms-continuation``) and Invoke Device Method
(``POST /twins/{id}/methods``). Served over HTTPS with the hub's certificate on its own port
(``FakeHub.service_port``). Every request needs ``Authorization: SharedAccessSignature sr=..&sig=..&se=..&skn=..``
signed with the key of one of ``FakeHub.service_policies``; ``sr`` is the hub host name (or the host:port the
request was sent to, as a test reaches it). A desired-property change is pushed to the connected device over
MQTT as ``$iothub/twin/PATCH/properties/desired/?$version=N``, as the real hub does.

Not modelled: per-policy permissions (any policy may do everything), per-leaf ``$metadata`` (only the section's
``$lastUpdated``/``$lastUpdatedVersion``), query projections (only ``SELECT * FROM devices [WHERE ...]``:
comparisons ``= != <> < > <= >=`` of a dotted path with a string, number, true/false/null, ``AND``, ``OR``,
``NOT``, parentheses and ``IS_DEFINED(path)``); a query outside that is answered 400 with the reason.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import http.server
import json
import re
import ssl
import threading
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from testsupport.fakehub.hub import (
    MAX_TWIN_DEPTH,
    MAX_TWIN_SECTION_BYTES,
    _bad_twin_keys,
    _depth,
    _merge,
    _twin_size,
    verify_sas,
)

if TYPE_CHECKING:
    from testsupport.fakehub.hub import Device, FakeHub

MAX_TAGS_BYTES = 8 * 1024  # "IoT Hub enforces an 8 KB size limit on the value of tags"
MAX_QUERY_PAGE = 100
MAX_BODY_BYTES = 1024 * 1024  # the fake's own bound on a request body (twins are 32 KB, method payloads 128 KB)
MAX_QUERY_NESTING = 50  # NOT / parentheses / AND / OR levels the fake's query parser follows
# Invoke Device Method, responseTimeoutInSeconds: "Minimum: 5 seconds, maximum: 300 seconds" (Microsoft's
# direct methods doc); absent, 30.
METHOD_TIMEOUT_RANGE_S = (5.0, 300.0)


class ApiError(Exception):
    def __init__(self, status: int, code: int, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f0Z")


def service_twin(hub: FakeHub, d: Device) -> dict[str, Any]:
    """The twin of ``d`` as the service API returns it (call with ``hub.lock`` held)."""
    connected = hub.is_connected(d.device_id)
    return copy.deepcopy(
        {
            "deviceId": d.device_id,
            "etag": d.etag,
            "deviceEtag": d.etag,
            "status": "enabled",
            "statusUpdateTime": "0001-01-01T00:00:00Z",
            "connectionState": "Connected" if connected else "Disconnected",
            "lastActivityTime": "0001-01-01T00:00:00Z",
            "cloudToDeviceMessageCount": len(d.c2d_queue),
            "authenticationType": "sas" if d.key else "selfSigned",
            "version": d.twin_version,
            "tags": d.tags,
            "properties": {
                "desired": {
                    **d.desired,
                    "$metadata": {"$lastUpdated": _iso(d.desired_updated), "$lastUpdatedVersion": d.desired_version},
                    "$version": d.desired_version,
                },
                "reported": {
                    **d.reported,
                    "$metadata": {"$lastUpdated": _iso(d.reported_updated)},
                    "$version": d.reported_version,
                },
            },
            "capabilities": {"iotEdge": False},
        }
    )


def _check_section(name: str, doc: dict[str, Any], limit: int) -> None:
    bad = _bad_twin_keys(doc)
    if bad:
        raise ApiError(400, 400004, f"{name}: invalid property names {bad}")
    if _depth(doc) > MAX_TWIN_DEPTH:
        raise ApiError(400, 400004, f"{name}: nesting deeper than {MAX_TWIN_DEPTH}")
    if _twin_size(doc) > limit:
        raise ApiError(400, 400004, f"{name}: over {limit // 1024} KB")


def update_twin(hub: FakeHub, device_id: str, body: Any, if_match: str | None, *, replace: bool) -> dict[str, Any]:
    """Apply a service twin update (PATCH merges, PUT replaces tags and desired); returns the new twin."""
    if not isinstance(body, dict):
        raise ApiError(400, 400004, "the body must be a twin JSON object")
    props = body.get("properties") or {}
    if not isinstance(props, dict) or (props.get("reported") not in (None, {})):
        raise ApiError(400, 400004, "reported properties are read-only for the service")
    tags, desired = body.get("tags"), props.get("desired")
    if tags is not None and not isinstance(tags, dict) or desired is not None and not isinstance(desired, dict):
        raise ApiError(400, 400004, "tags and properties.desired must be JSON objects")
    push: bytes | None = None
    with hub.lock:
        d = hub.devices.get(device_id)
        if d is None:
            raise ApiError(404, 404001, f"device {device_id!r} not found")
        wanted = None if if_match is None else if_match.strip().strip('"')
        if wanted not in (None, "*") and wanted != d.etag:
            raise ApiError(412, 412002, f"etag {if_match} does not match the twin's {d.etag}")
        new_tags = {} if replace else copy.deepcopy(d.tags)
        new_desired = {} if replace else copy.deepcopy(d.desired)
        patch = {k: v for k, v in (desired or {}).items() if not k.startswith("$")}
        if tags is not None:
            _merge(new_tags, tags)
        _merge(new_desired, patch)
        _check_section("tags", new_tags, MAX_TAGS_BYTES)
        _check_section("properties.desired", new_desired, MAX_TWIN_SECTION_BYTES)
        tags_changed, desired_changed = new_tags != d.tags, new_desired != d.desired
        if tags_changed:
            d.tags = new_tags
        if desired_changed:
            if replace:  # delivered as the patch from the old document to the new one
                patch = {**{k: None for k in d.desired if k not in new_desired}, **new_desired}
            d.desired = new_desired
            d.desired_version += 1
            d.desired_updated = time.time()
            push = json.dumps({**patch, "$version": d.desired_version}).encode()
            version = d.desired_version
        if tags_changed or desired_changed:
            d.twin_version += 1
        twin = service_twin(hub, d)
    if push is not None:
        hub._call(lambda: hub._push_desired(device_id, push, version))
    return twin


# -- query ----------------------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<num>-?\d+(?:\.\d+)?)|(?P<op><>|!=|<=|>=|=|<|>)|(?P<par>[(),])"
    r"|(?P<word>[A-Za-z_$][\w$]*(?:\.[A-Za-z_$][\w$]*)*)|(?P<star>\*))"
)
_MISSING = object()


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ApiError(400, 400004, f"query syntax error at {text[pos : pos + 20]!r}")
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, toks: list[tuple[str, str]]):
        self.toks, self.i = toks, 0
        self.depth = 0

    def _deeper(self) -> None:
        self.depth += 1
        if self.depth > MAX_QUERY_NESTING:
            raise ApiError(400, 400004, f"query nested deeper than {MAX_QUERY_NESTING} levels")

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, kind: str | None = None, word: str | None = None) -> tuple[str, str]:
        t = self.peek()
        if t is None or (kind and t[0] != kind) or (word and t[1].upper() != word):
            raise ApiError(400, 400004, f"query syntax error: expected {word or kind}, found {t[1] if t else 'end'}")
        self.i += 1
        return t

    def is_word(self, word: str) -> bool:
        t = self.peek()
        return t is not None and t[0] == "word" and t[1].upper() == word

    def expr(self) -> Any:
        self._deeper()
        node = self.conj()
        while self.is_word("OR"):
            self.take()
            self._deeper()
            node = ("or", node, self.conj())
        return node

    def conj(self) -> Any:
        node = self.neg()
        while self.is_word("AND"):
            self.take()
            self._deeper()
            node = ("and", node, self.neg())
        return node

    def neg(self) -> Any:
        if self.is_word("NOT"):
            self.take()
            self._deeper()
            return ("not", self.neg())
        return self.atom()

    def atom(self) -> Any:
        t = self.peek()
        if t == ("par", "("):
            self.take()
            node = self.expr()
            self.take("par")
            return node
        if self.is_word("IS_DEFINED"):
            self.take()
            self.take("par")
            path = self.take("word")[1]
            self.take("par")
            return ("defined", path)
        path = self.take("word")[1]
        op = self.take("op")[1]
        kind, raw = self.take()
        value: Any
        if kind == "str":
            value = raw[1:-1].replace("''", "'")
        elif kind == "num":
            value = float(raw) if "." in raw else int(raw)
        elif kind == "word" and raw.lower() in ("true", "false", "null"):
            value = {"true": True, "false": False, "null": None}[raw.lower()]
        else:
            raise ApiError(400, 400004, f"query: {raw!r} is not a literal")
        return ("cmp", path, op, value)


def parse_query(text: str) -> Any:
    """Parse ``SELECT * FROM devices [WHERE cond]``; returns the WHERE tree (None = all devices)."""
    p = _Parser(_tokens(text))
    p.take("word", "SELECT")
    if p.peek() != ("star", "*"):
        raise ApiError(400, 400004, "the fake hub answers only SELECT * queries")
    p.take("star")
    p.take("word", "FROM")
    src = p.take("word")[1]
    if src.lower() != "devices":
        raise ApiError(400, 400004, f"the fake hub answers queries FROM devices only, not {src!r}")
    where = None
    if p.is_word("WHERE"):
        p.take()
        where = p.expr()
    if p.peek() is not None:
        raise ApiError(400, 400004, f"query: unexpected {p.peek()[1]!r}")  # type: ignore[index]
    return where


def _lookup(doc: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return _MISSING
        doc = doc[part]
    return doc


def matches(where: Any, twin: dict[str, Any]) -> bool:
    """Evaluate a parsed WHERE tree against a service twin (a missing property compares false)."""
    if where is None:
        return True
    kind = where[0]
    if kind == "or":
        return matches(where[1], twin) or matches(where[2], twin)
    if kind == "and":
        return matches(where[1], twin) and matches(where[2], twin)
    if kind == "not":
        return not matches(where[1], twin)
    if kind == "defined":
        return _lookup(twin, where[1]) is not _MISSING
    _, path, op, value = where
    got = _lookup(twin, path)
    if got is _MISSING:
        return False
    if op == "=":
        return bool(got == value)
    if op in ("!=", "<>"):
        return bool(got != value)
    comparable = (isinstance(got, str) and isinstance(value, str)) or (
        isinstance(got, int | float) and isinstance(value, int | float) and not isinstance(got, bool)
    )
    if not comparable:
        return False
    return bool({"<": got < value, ">": got > value, "<=": got <= value, ">=": got >= value}[op])


# -- HTTP -----------------------------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.request.settimeout(30)
        self.request.do_handshake()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
        self.server.hub._event(None, "service-api", format % args)

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        length = (self.headers.get("Content-Length") or "0").strip()
        if not length.isascii() or not length.isdigit():
            self.close_connection = True  # the body's end is unknown: nothing more can be read on this connection
            raise ApiError(400, 400004, f"Content-Length {length!r} is not a number of bytes")
        n = int(length)
        if n > MAX_BODY_BYTES:
            self.close_connection = True
            raise ApiError(413, 413002, f"request body of {n} bytes is over {MAX_BODY_BYTES}")
        raw = self.rfile.read(n) if n else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except RecursionError as exc:
            raise ApiError(400, 400004, "body is JSON nested too deep") from exc
        except ValueError as exc:
            raise ApiError(400, 400004, f"body is not JSON: {exc}") from exc

    def _auth(self) -> None:
        token = self.headers.get("Authorization") or ""
        fields = dict(part.partition("=")[::2] for part in token.partition(" ")[2].split("&"))
        policy = unquote(fields.get("skn", ""))
        key = self.server.hub.service_policies.get(policy)
        if key is None:
            raise ApiError(401, 401002, f"IotHubUnauthorizedAccess: unknown shared access policy {policy!r}")
        hosts = (self.server.hub.hostname, self.headers.get("Host") or "")
        ok, reason, _ = verify_sas(token, hosts, key, self.server.hub.now(), policy)
        if not ok:
            raise ApiError(401, 401002, f"IotHubUnauthorizedAccess: {reason}")

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        try:
            self._auth()
            if not query.get("api-version"):
                raise ApiError(400, 400004, "api-version is required")
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            body = self._body() if method in ("PATCH", "PUT", "POST") else None
            hub = self.server.hub
            if len(parts) == 2 and parts[0] == "twins" and method == "GET":
                with hub.lock:
                    d = hub.devices.get(parts[1])
                    if d is None:
                        raise ApiError(404, 404001, f"device {parts[1]!r} not found")
                    twin = service_twin(hub, d)
                self._send(200, twin, {"ETag": f'"{twin["etag"]}"'})
            elif len(parts) == 2 and parts[0] == "twins" and method in ("PATCH", "PUT"):
                twin = update_twin(hub, parts[1], body, self.headers.get("If-Match"), replace=method == "PUT")
                self._send(200, twin, {"ETag": f'"{twin["etag"]}"'})
            elif len(parts) == 3 and parts[0] == "twins" and parts[2] == "methods" and method == "POST":
                self._method(parts[1], body)
            elif parts == ["devices", "query"] and method == "POST":
                self._query(body)
            else:
                raise ApiError(404, 404000, f"{method} {url.path} is not part of the fake hub's service API")
        except ApiError as exc:
            self._send(exc.status, {"errorCode": exc.code, "message": exc.message, "Message": exc.message})
        except Exception as exc:  # a bug of the fake: answered as the real service would, 500, never a dropped socket
            self.server.hub._event(None, "service-api-error", repr(exc))
            self._send(
                500, {"errorCode": 500001, "message": f"ServerError: {exc!r}", "Message": f"ServerError: {exc!r}"}
            )

    def _method(self, device_id: str, body: Any) -> None:
        if not isinstance(body, dict) or not isinstance(body.get("methodName"), str):
            raise ApiError(400, 400004, "body must name methodName")
        with self.server.hub.lock:
            if device_id not in self.server.hub.devices:
                raise ApiError(404, 404001, f"device {device_id!r} not found")
        timeout = body.get("responseTimeoutInSeconds", 30)
        lo, hi = METHOD_TIMEOUT_RANGE_S
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not lo <= timeout <= hi:
            raise ApiError(400, 400004, f"responseTimeoutInSeconds must be a number of seconds from {lo:g} to {hi:g}")
        try:
            status, payload = self.server.hub.invoke_method(
                device_id, body["methodName"], body.get("payload"), timeout=timeout
            )
        except ValueError as exc:
            raise ApiError(400, 400004, str(exc)) from exc
        if status == 404 and isinstance(payload, dict) and payload.get("errorCode") == 404103:
            raise ApiError(404, 404103, "DeviceNotOnline: timed out waiting for the device to connect")
        if status == 504 and isinstance(payload, dict) and payload.get("errorCode") == 504101:
            raise ApiError(504, 504101, "GatewayTimeout: timed out waiting for the device's response")
        if status == 400 and isinstance(payload, dict) and "128 KB" in str(payload.get("message")):
            raise ApiError(400, 400004, str(payload["message"]))
        self._send(200, {"status": status, "payload": payload})

    def _query(self, body: Any) -> None:
        if not isinstance(body, dict) or not isinstance(body.get("query"), str):
            raise ApiError(400, 400004, 'body must be {"query": "..."}')
        where = parse_query(body["query"])
        hub = self.server.hub
        with hub.lock:
            twins = [service_twin(hub, d) for _, d in sorted(hub.devices.items())]
        hits = [t for t in twins if matches(where, t)]
        try:
            size = min(int(self.headers.get("x-ms-max-item-count") or MAX_QUERY_PAGE), MAX_QUERY_PAGE)
            start = int(base64.b64decode(self.headers.get("x-ms-continuation") or "MA==").decode())
        except ValueError as exc:
            raise ApiError(400, 400004, f"bad paging header: {exc}") from exc
        page = hits[start : start + max(size, 1)]
        headers = {"x-ms-item-type": "twin"}
        if start + len(page) < len(hits):
            headers["x-ms-continuation"] = base64.b64encode(str(start + len(page)).encode()).decode()
        self._send(200, page, headers)

    def do_GET(self) -> None:  # noqa: N802 - http.server's names
        self._route("GET")

    def do_PATCH(self) -> None:  # noqa: N802
        self._route("PATCH")

    def do_PUT(self) -> None:  # noqa: N802
        self._route("PUT")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: FakeHub, port: int, ctx: ssl.SSLContext):
        self.hub = hub
        super().__init__(("127.0.0.1", port), _Handler)
        self.socket = ctx.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)


class ServiceApi:
    """The HTTPS server of the service API for ``hub`` (started and stopped by :class:`FakeHub`)."""

    def __init__(self, hub: FakeHub, port: int = 0):
        self.hub, self.port = hub, port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.hub.certfile, self.hub.keyfile)  # type: ignore[arg-type]
        self._server = _Server(self.hub, self.port, ctx)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="fakehub-service", daemon=True)
        self._thread.start()
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
