"""A small client of IoT Hub's service REST API (api-version 2021-04-12): twins, twin queries, direct methods.

Microsoft documents these calls as "IoT Hub service REST API" (Get/Update Device Twin, Query IoT Hub, Invoke
Device Method); this client needs only the standard library. Authentication is a service SAS token made
from a connection string ``HostName=<hub>.azure-devices.net;SharedAccessKeyName=<policy>;SharedAccessKey=<b64>``
(the policy needs *Registry read* and *Service connect*, e.g. the built-in ``service`` policy plus
``registryRead``, or ``iothubowner``); the token is renewed before it expires.
"""

from __future__ import annotations

import base64
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from appliance.cloud.sas import API_VERSION, generate_sas_token
from appliance.core.logs import get_logger

log = get_logger(__name__)
TOKEN_TTL_S = 3600


class HubServiceError(Exception):
    """The service answered an error (``status``: HTTP status, 0 when it could not be reached)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"IoT Hub service: {status or 'unreachable'}: {message}")
        self.status = status


class EtagMismatch(HubServiceError):
    """412: the twin changed since it was read (``If-Match``)."""


@dataclass(frozen=True)
class ConnectionString:
    """A parsed IoT Hub service connection string."""

    host: str  # HostName, e.g. myhub.azure-devices.net (a test hub may add :port)
    policy: str
    key: str  # base64

    @classmethod
    def parse(cls, text: str) -> ConnectionString:
        """Raises ValueError naming what is missing or malformed (never echoing the key)."""
        fields: dict[str, str] = {}
        for part in text.strip().split(";"):
            if part:
                k, sep, v = part.partition("=")
                if not sep:
                    raise ValueError(f"connection string part {k!r} has no '='")
                fields[k.strip()] = v.strip()
        missing = [k for k in ("HostName", "SharedAccessKeyName", "SharedAccessKey") if not fields.get(k)]
        if missing:
            raise ValueError(f"connection string lacks {', '.join(missing)} (a device connection string will not do)")
        try:
            base64.b64decode(fields["SharedAccessKey"], validate=True)
        except ValueError as exc:
            raise ValueError("SharedAccessKey is not base64") from exc
        return cls(fields["HostName"], fields["SharedAccessKeyName"], fields["SharedAccessKey"])


class HubService:
    """Calls to one hub's service API. ``ca_file``: PEM bundle to trust instead of the system's (tests)."""

    def __init__(self, conn: ConnectionString, *, ca_file: str | None = None, timeout_s: float = 30.0):
        self.conn = conn
        self.timeout_s = timeout_s
        self._ctx = ssl.create_default_context(cafile=ca_file)
        self._token = ""
        self._token_expiry = 0.0

    def _auth(self) -> str:
        now = time.time()
        if now > self._token_expiry - 300:
            expiry = int(now + TOKEN_TTL_S)
            self._token = generate_sas_token(self.conn.host, self.conn.key, expiry, self.conn.policy)
            self._token_expiry = expiry
        return self._token

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[Any, dict[str, str]]:
        """(parsed JSON body or None, response headers). Raises :class:`HubServiceError` / :class:`EtagMismatch`."""
        url = f"https://{self.conn.host}{path}{'&' if '?' in path else '?'}api-version={API_VERSION}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Authorization", self._auth())
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json; charset=utf-8")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s, context=self._ctx) as resp:
                raw = resp.read()
                hdrs = {k.lower(): v for k, v in resp.headers.items()}
        except urllib.error.HTTPError as exc:
            text = exc.read().decode("utf-8", "replace")
            try:
                doc = json.loads(text)
                message = str(doc.get("message") or doc.get("Message") or text)
            except ValueError:
                message = text or exc.reason
            cls = EtagMismatch if exc.code == 412 else HubServiceError
            raise cls(exc.code, message[:500]) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise HubServiceError(0, str(getattr(exc, "reason", exc))) from exc
        return (json.loads(raw) if raw else None), hdrs

    def get_twin(self, device_id: str) -> dict[str, Any]:
        """``GET /twins/{id}``: the twin (deviceId, etag, tags, properties.desired/reported ...)."""
        doc, _ = self.request("GET", f"/twins/{quote(device_id, safe='')}")
        return dict(doc)

    def update_twin(self, device_id: str, patch: dict[str, Any], etag: str | None = None) -> dict[str, Any]:
        """``PATCH /twins/{id}`` (merge; null deletes) with ``If-Match: etag`` (``*`` when None); the new twin."""
        doc, _ = self.request(
            "PATCH", f"/twins/{quote(device_id, safe='')}", patch, {"If-Match": f'"{etag}"' if etag else "*"}
        )
        return dict(doc)

    def query(self, sql: str, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """``POST /devices/query``: every twin the IoT Hub query language ``sql`` selects, page by page."""
        continuation: str | None = None
        while True:
            headers = {"x-ms-max-item-count": str(page_size)}
            if continuation:
                headers["x-ms-continuation"] = continuation
            doc, hdrs = self.request("POST", "/devices/query", {"query": sql}, headers)
            yield from doc or []
            continuation = hdrs.get("x-ms-continuation")
            if not continuation:
                return

    def invoke_method(self, device_id: str, name: str, payload: Any = None, timeout_s: int = 30) -> dict[str, Any]:
        """``POST /twins/{id}/methods``: ``{"status": int, "payload": ...}`` as the device answered."""
        body = {"methodName": name, "payload": payload, "responseTimeoutInSeconds": timeout_s}
        doc, _ = self.request("POST", f"/twins/{quote(device_id, safe='')}/methods", body)
        return dict(doc)
