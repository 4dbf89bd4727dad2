"""IoT Hub shared access signatures: HMAC-SHA256 over the URL-encoded resource URI, a newline and the expiry."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from urllib.parse import quote

API_VERSION = "2021-04-12"

# A clock before this (the release year of this software) cannot be right; SAS tokens would be refused.
MIN_PLAUSIBLE_TIME = 1735689600  # 2025-01-01T00:00:00Z


def device_resource_uri(hub_hostname: str, device_id: str) -> str:
    return f"{hub_hostname}/devices/{device_id}"


def generate_sas_token(resource_uri: str, key_b64: str, expiry: int, policy: str | None = None) -> str:
    """``SharedAccessSignature sr=..&sig=..&se=..[&skn=..]`` valid until unix time ``expiry``."""
    encoded_uri = quote(resource_uri, safe="")
    to_sign = f"{encoded_uri}\n{int(expiry)}".encode()
    key = base64.b64decode(key_b64, validate=True)
    sig = base64.b64encode(hmac.new(key, to_sign, hashlib.sha256).digest()).decode()
    token = f"SharedAccessSignature sr={encoded_uri}&sig={quote(sig, safe='')}&se={int(expiry)}"
    if policy:
        token += f"&skn={quote(policy, safe='')}"
    return token


def device_token(
    hub_hostname: str, device_id: str, key_b64: str, ttl_s: int, now: float | None = None
) -> tuple[str, int]:
    """A device SAS token and its expiry (unix seconds)."""
    expiry = int((time.time() if now is None else now) + ttl_s)
    return generate_sas_token(device_resource_uri(hub_hostname, device_id), key_b64, expiry), expiry


def derive_device_key(group_key_b64: str, registration_id: str) -> str:
    """DPS symmetric-key enrollment group: device key = b64(HMAC-SHA256(b64dec(group key), registration id))."""
    key = base64.b64decode(group_key_b64, validate=True)
    return base64.b64encode(hmac.new(key, registration_id.encode(), hashlib.sha256).digest()).decode()


def username(hub_hostname: str, device_id: str) -> str:
    return f"{hub_hostname}/{device_id}/?api-version={API_VERSION}"


def clock_problem(now: float | None = None) -> str | None:
    """A clear message if the system clock is obviously wrong (SAS expiry is computed from it)."""
    t = time.time() if now is None else now
    if t < MIN_PLAUSIBLE_TIME:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
        return (
            f"system clock reads {stamp}, before this software was built: SAS tokens computed from it are "
            "already expired and IoT Hub will refuse them; fix the time (NTP / RTC battery)"
        )
    return None
