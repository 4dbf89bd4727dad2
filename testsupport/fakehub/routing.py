"""IoT Hub message routing to a storage endpoint, as the service does it: Avro container files in a Blob container.

Follows Microsoft's "IoT Hub message routing" and the ``RoutingStorageContainerProperties`` reference (management API):
messages are batched per hub partition and written when the batch is ``batch_frequency_s`` old (60..720 s, default
300) or holds ``max_chunk_bytes`` (10 MB..500 MB, default 300 MB); the blob name follows ``file_name_format``
(default ``{iothub}/{partition}/{YYYY}/{MM}/{DD}/{HH}/{mm}``; every token mandatory, any order), the time being the
batch's; ``encoding`` ``avro`` or ``avrodeflate``. Each record has IoT Hub's routing schema
(``Microsoft.Azure.Devices.Message``): ``EnqueuedTimeUtc`` (string, .NET round-trip UTC with 7 fraction digits),
``Properties`` (the application properties), ``SystemProperties`` (``connectionDeviceId``,
``connectionAuthMethod``, ``connectionDeviceGenerationId``, ``enqueuedTime``, and ``messageId``, ``contentType``,
``contentEncoding`` where the device set them) and ``Body`` (bytes). Settings outside the documented ranges are
refused with ValueError, as the service's management API refuses them.

Tests cannot wait minutes: :meth:`StorageEndpoint.flush` writes the open batches now (what the batch timer does
when it fires); ``batch_frequency_s`` still runs a real timer. When two batches of a partition fall in the same
minute (chunk size reached), the later blob's name gets ``-<n>`` appended: the service's own rule for that case is
not documented.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fastavro

MESSAGE_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Message",
    "namespace": "Microsoft.Azure.Devices",
    "fields": [
        {"name": "EnqueuedTimeUtc", "type": "string"},
        {"name": "Properties", "type": {"type": "map", "values": "string"}},
        {"name": "SystemProperties", "type": {"type": "map", "values": "string"}},
        {"name": "Body", "type": ["null", "bytes"]},
    ],
}
DEFAULT_FORMAT = "{iothub}/{partition}/{YYYY}/{MM}/{DD}/{HH}/{mm}"
TOKENS = ("{iothub}", "{partition}", "{YYYY}", "{MM}", "{DD}", "{HH}", "{mm}")
# the device-settable system properties as they arrive in an MQTT property bag -> their routing names
_DEVICE_SYSTEM = {"$.mid": "messageId", "$.ct": "contentType", "$.ce": "contentEncoding", "$.cid": "correlationId"}
_PARSED = fastavro.parse_schema(MESSAGE_SCHEMA)


def dotnet_utc(ts: float) -> str:
    """``2024-05-07T10:11:12.3450000Z``: the round-trip form IoT Hub writes in ``EnqueuedTimeUtc``."""
    whole = int(ts)
    ticks = int(round((ts - whole) * 10_000_000))
    if ticks >= 10_000_000:
        whole, ticks = whole + 1, ticks - 10_000_000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{ticks:07d}Z"


def record(
    device_id: str, props: dict[str, str], body: bytes, enqueued: float, auth_method: str = "sas"
) -> dict[str, Any]:
    """One routed message in IoT Hub's Avro record shape (``props``: the MQTT property bag as the hub parsed it)."""
    system = {
        "connectionDeviceId": device_id,
        "connectionAuthMethod": '{"scope":"device","type":"'
        + auth_method
        + '","issuer":"iothub","acceptingIpFilterRule":null}',
        "connectionDeviceGenerationId": str(int(hashlib.sha256(device_id.encode()).hexdigest()[:15], 16)),
        "enqueuedTime": dotnet_utc(enqueued),
    }
    app: dict[str, str] = {}
    for k, v in props.items():
        if k in _DEVICE_SYSTEM:
            system[_DEVICE_SYSTEM[k]] = v
        elif not k.startswith("$."):
            app[k] = v
    return {"EnqueuedTimeUtc": dotnet_utc(enqueued), "Properties": app, "SystemProperties": system, "Body": body}


@dataclass
class _Batch:
    opened: float
    records: list[dict[str, Any]] = field(default_factory=list)
    size: int = 0


class StorageEndpoint:
    """A routing storage endpoint. ``sink(blob_name, data)`` stores one finished Avro file (e.g. a Blob container's
    ``upload_blob``; :func:`container_sink` makes one). Raises ValueError for settings the service refuses."""

    def __init__(
        self,
        sink: Callable[[str, bytes], Any],
        *,
        iothub: str = "fakehub",
        partitions: int = 4,
        file_name_format: str = DEFAULT_FORMAT,
        batch_frequency_s: int = 300,
        max_chunk_bytes: int = 314_572_800,
        encoding: str = "avro",
        clock: Callable[[], float] = time.time,
    ):
        if not 60 <= batch_frequency_s <= 720:
            raise ValueError("batchFrequencyInSeconds must be between 60 and 720")
        if not 10_485_760 <= max_chunk_bytes <= 524_288_000:
            raise ValueError("maxChunkSizeInBytes must be between 10485760 (10 MB) and 524288000 (500 MB)")
        if encoding.lower() not in ("avro", "avrodeflate"):
            raise ValueError("encoding must be 'avro' or 'avrodeflate' (JSON is a different endpoint encoding)")
        missing = [t for t in TOKENS if file_name_format.count(t) != 1]
        if missing:
            raise ValueError(f"fileNameFormat must contain each of {', '.join(TOKENS)} once: missing {missing}")
        if not 2 <= partitions <= 128:
            raise ValueError("a hub has 2..128 device-to-cloud partitions")
        self.sink, self.iothub, self.partitions = sink, iothub, partitions
        self.file_name_format, self.batch_frequency_s = file_name_format, batch_frequency_s
        self.max_chunk_bytes, self.codec = max_chunk_bytes, ("deflate" if encoding.lower() == "avrodeflate" else "null")
        self.clock = clock
        self.written: list[str] = []
        self._batches: dict[int, _Batch] = {}
        self._names: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._tick, name="fakehub-route", daemon=True)
        self._timer.start()

    def partition_of(self, device_id: str) -> int:
        """The hub partition a device's messages go to (stable per device, as IoT Hub partitions by device)."""
        return int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:4], "big") % self.partitions

    def route(self, rec: dict[str, Any]) -> None:
        """Add one record (from :func:`record`); writes its partition's batch first if it would pass the chunk size."""
        part = self.partition_of(rec["SystemProperties"]["connectionDeviceId"])
        size = (
            len(rec["Body"] or b"")
            + sum(len(k) + len(v) for m in ("Properties", "SystemProperties") for k, v in rec[m].items())
            + 40
        )
        with self._lock:
            batch = self._batches.get(part)
            if batch is not None and batch.size + size > self.max_chunk_bytes:
                self._write(part, self._batches.pop(part))
                batch = None
            if batch is None:
                batch = self._batches[part] = _Batch(self.clock())
            batch.records.append(rec)
            batch.size += size

    def flush(self) -> list[str]:
        """Write every open batch now (what the batch timer does); the names of the blobs written."""
        with self._lock:
            batches, self._batches = self._batches, {}
            return [self._write(p, b) for p, b in sorted(batches.items())]

    def close(self) -> None:
        """Stop the batch timer and write what is open."""
        self._stop.set()
        self.flush()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            now = self.clock()
            with self._lock:
                due = [p for p, b in self._batches.items() if now - b.opened >= self.batch_frequency_s]
                for p in due:
                    self._write(p, self._batches.pop(p))

    def _name(self, part: int, at: float) -> str:
        t = time.gmtime(at)
        name = self.file_name_format
        for token, value in (
            ("{iothub}", self.iothub),
            ("{partition}", str(part)),
            ("{YYYY}", f"{t.tm_year:04d}"),
            ("{MM}", f"{t.tm_mon:02d}"),
            ("{DD}", f"{t.tm_mday:02d}"),
            ("{HH}", f"{t.tm_hour:02d}"),
            ("{mm}", f"{t.tm_min:02d}"),
        ):
            name = name.replace(token, value)
        base, n = name, 0
        while name in self._names:
            n += 1
            name = f"{base}-{n}"
        self._names.add(name)
        return name

    def _write(self, part: int, batch: _Batch) -> str:
        buf = io.BytesIO()
        fastavro.writer(buf, _PARSED, batch.records, codec=self.codec)
        name = self._name(part, batch.opened)
        self.sink(name, buf.getvalue())
        self.written.append(name)
        return name


def container_sink(container_client: Any) -> Callable[[str, bytes], Any]:
    """A sink writing block blobs into an ``azure.storage.blob.ContainerClient`` (Azurite in tests)."""
    return lambda name, data: container_client.upload_blob(name, data, overwrite=False)


def folder_sink(root: Any) -> Callable[[str, bytes], Any]:
    """A sink writing files under a local folder (same relative names as the blobs)."""
    from pathlib import Path

    def write(name: str, data: bytes) -> None:
        if re.search(r"(^|/)\.\.(/|$)", name):
            raise ValueError(f"blob name {name!r} leaves the folder")
        path = Path(root) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return write
