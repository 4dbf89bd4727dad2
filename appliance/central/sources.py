"""Where hub events come from, one at a time: Avro files IoT Hub routed to storage (a Blob container or a local
copy of one) and JSON-lines exports (what ``appliance central decrypt`` reads).

Avro files are Avro object container files (Apache Avro 1.11 specification, "Object Container Files": a header
with the writer's schema and a 16-byte sync marker, then blocks ``count, size, data, sync``). They are read block
by block with the ``null`` or ``deflate`` codec (IoT Hub's ``avro`` / ``avrodeflate`` encodings), one block in
memory at a time: a block's data at most :data:`MAX_BLOCK_BYTES`, inflated at most :data:`MAX_INFLATED_BLOCK_BYTES`
(a deflate bomb is refused before it grows past that), and its records checked then handed out one by one. A
corrupt or truncated block is reported (:class:`Item` with ``error``) and reading resumes at the next sync
marker, so the rest of the file is still read; a file whose header is not an Avro header or whose schema is not
IoT Hub's routed-message shape is reported whole. Blobs are downloaded one at a time into a temporary file
(bounded memory whatever the blob's size) and deleted after.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

import fastavro

from appliance.central.flatten import parse_utc
from appliance.central.received import IDENTITY

MAGIC = b"Obj\x01"
HEADER_SCHEMA = fastavro.parse_schema(
    {
        "type": "record",
        "name": "org.apache.avro.file.Header",
        "fields": [
            {"name": "magic", "type": {"type": "fixed", "name": "Magic", "size": 4}},
            {"name": "meta", "type": {"type": "map", "values": "bytes"}},
            {"name": "sync", "type": {"type": "fixed", "name": "Sync", "size": 16}},
        ],
    }
)
ROUTED_FIELDS = {"EnqueuedTimeUtc", "Properties", "SystemProperties", "Body"}
MAX_BLOCK_BYTES = 64 * 1024 * 1024  # IoT Hub writes far smaller blocks; a bigger size field is corruption
MAX_INFLATED_BLOCK_BYTES = 64 * 1024 * 1024  # a deflate block inflating past this is refused, never held
MAX_LINE_BYTES = 1024 * 1024  # an IoT Hub message is at most 256 KB
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}


@dataclass(frozen=True)
class Item:
    """One event read from ``source`` at byte ``offset`` (a block's offset for Avro; ``index`` = the record's
    place in its block, 0 for JSON lines): ``record`` (a routed record or an exported event) with its hub
    ``enqueued_time``, or ``error`` = (reason, detail) for what could not be read."""

    source: str
    offset: int
    index: int = 0
    record: Mapping[str, Any] | None = None
    enqueued_time: dt.datetime | None = None
    error: tuple[str, str] | None = None


def enqueued_time_of(record: Mapping[str, Any]) -> dt.datetime:
    """The hub's enqueued time of a routed record (``EnqueuedTimeUtc``) or exported event
    (``system_properties.iothub-enqueuedtime``), aware UTC. Raises ValueError."""
    if "EnqueuedTimeUtc" in record:
        return parse_utc(record["EnqueuedTimeUtc"])
    system = record.get("system_properties")
    if isinstance(system, Mapping):
        return parse_utc(system.get("iothub-enqueuedtime"))
    raise ValueError("no enqueued time")


def _item(source: str, offset: int, index: int, record: Any) -> Item:
    if not isinstance(record, Mapping):
        return Item(source, offset, index, error=("malformed", f"a {type(record).__name__}, not an event"))
    try:
        when = enqueued_time_of(record)
    except ValueError as exc:
        return Item(source, offset, index, error=("malformed", f"enqueued time: {exc}"))
    return Item(source, offset, index, record=record, enqueued_time=when)


def _read_long(fo: IO[bytes]) -> int:
    """An Avro ``long`` (zig-zag varint). Raises EOFError at the end, ValueError when over 10 bytes."""
    shift = result = 0
    for _ in range(10):
        b = fo.read(1)
        if not b:
            raise EOFError("end of file inside a block header")
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return (result >> 1) ^ -(result & 1)
        shift += 7
    raise ValueError("varint over 10 bytes")


def _resync(fo: IO[bytes], sync: bytes, start: int) -> bool:
    """Seek just past the next ``sync`` at or after ``start``; False at the end of the file."""
    fo.seek(start)
    tail = b""
    while True:
        chunk = fo.read(1 << 20)
        if not chunk:
            return False
        data = tail + chunk
        i = data.find(sync)
        if i >= 0:
            fo.seek(fo.tell() - len(data) + i + len(sync))
            return True
        tail = data[-(len(sync) - 1) :]


def read_avro(fo: IO[bytes], source: str) -> Iterator[Item]:
    """Every record of one Avro container file (seekable ``fo``), block by block; see the module docstring."""
    try:
        header = fastavro.schemaless_reader(fo, HEADER_SCHEMA, None)
        assert isinstance(header, dict)
        if header["magic"] != MAGIC:
            raise ValueError("not an Avro object container file (bad magic)")
        meta = header["meta"]
        codec = meta.get("avro.codec", b"null").decode()
        if codec not in ("null", "deflate"):
            raise ValueError(f"codec {codec!r}: IoT Hub writes null (avro) or deflate (avrodeflate)")
        schema = json.loads(meta["avro.schema"])
        names = {f.get("name") for f in schema.get("fields", [])} if isinstance(schema, dict) else set()
        if not names >= ROUTED_FIELDS:
            raise ValueError(f"schema fields {sorted(map(str, names))} are not IoT Hub's routed message")
        parsed = fastavro.parse_schema(schema)
        sync: bytes = header["sync"]
    except Exception as exc:  # any header fault: the whole file is unreadable, other files are not
        yield Item(source, 0, error=("corrupt_file", f"{type(exc).__name__}: {exc}"[:300]))
        return
    while True:
        start = fo.tell()
        try:
            count = _read_long(fo)
        except EOFError:
            return  # a clean end of file
        except ValueError as exc:
            count, size = -1, -1
            err = str(exc)
        else:
            err = ""
            try:
                size = _read_long(fo)
            except (EOFError, ValueError) as exc:
                size, err = -1, str(exc)
        raw = b""
        if not err:
            if not (0 <= count <= size * 8 + 1 and 0 <= size <= MAX_BLOCK_BYTES):
                err = f"implausible block header (count {count}, size {size})"
            else:
                data = fo.read(size)
                marker = fo.read(16)
                if len(data) < size or len(marker) < 16:
                    err = "truncated block"
                elif marker != sync:
                    err = "sync marker mismatch"
                else:
                    try:
                        raw = _inflate(data) if codec == "deflate" else data
                        del data
                        _check_records(raw, parsed, count)
                    except Exception as exc:
                        err = f"{type(exc).__name__}: {exc}"
        if err:
            yield Item(source, start, error=("corrupt_block", err[:300]))
            if not _resync(fo, sync, start + 1):
                return
            continue
        # the block is whole: its records again, one at a time (a block may declare millions of tiny records;
        # only the one being read is held, never the block's list)
        bio = io.BytesIO(raw)
        for i in range(count):
            yield _item(source, start, i, fastavro.schemaless_reader(bio, parsed, None))


def _check_records(raw: bytes, parsed: Any, count: int) -> None:
    """Raise unless ``raw`` holds exactly ``count`` records of ``parsed`` (each decoded and dropped at once)."""
    bio = io.BytesIO(raw)
    for _ in range(count):
        fastavro.schemaless_reader(bio, parsed, None)
    if bio.tell() != len(raw):
        raise ValueError(f"{len(raw) - bio.tell()} bytes left after {count} records")


def _inflate(data: bytes) -> bytes:
    """Raw deflate ``data`` (Avro's ``deflate`` codec, RFC 1951) inflated to at most
    :data:`MAX_INFLATED_BLOCK_BYTES`; ValueError for corrupt data or a block that inflates beyond (a deflate
    bomb: about 1 000 times its size), never more memory than that bound."""
    inflater = zlib.decompressobj(-15)
    try:
        raw = inflater.decompress(data, MAX_INFLATED_BLOCK_BYTES + 1)
    except zlib.error as exc:
        raise ValueError(f"deflate data corrupt: {exc}") from exc
    if len(raw) > MAX_INFLATED_BLOCK_BYTES or inflater.unconsumed_tail:
        raise ValueError(f"deflate block inflates past {MAX_INFLATED_BLOCK_BYTES} bytes (a deflate bomb?)")
    if not inflater.eof:
        raise ValueError("deflate data truncated")
    return raw


def read_jsonl(fo: IO[bytes], source: str) -> Iterator[Item]:
    """Every event of a JSON-lines export (one event per line; blank lines skipped), one line in memory."""
    offset = 0
    while True:
        line = fo.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        at, offset = offset, offset + len(line)
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            yield Item(source, at, error=("malformed", f"line over {MAX_LINE_BYTES} bytes"))
            while line and not line.endswith(b"\n"):  # skip the rest of the line
                line = fo.readline(MAX_LINE_BYTES)
                offset += len(line)
            continue
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            yield Item(source, at, error=("malformed", f"not JSON: {exc}"[:300]))
            continue
        if isinstance(doc, dict) and "system_properties" not in doc and "SystemProperties" not in doc:
            yield Item(source, at, error=("no_identity", f"a bare envelope has no {IDENTITY}"))
            continue
        yield _item(source, at, 0, doc)


def read_file(path: Path, source: str | None = None) -> Iterator[Item]:
    """One local file: JSON lines by suffix (.jsonl, .json, .ndjson), otherwise Avro (routed blobs have no suffix)."""
    name = source or str(path)
    try:
        fo = open(path, "rb")  # noqa: SIM115 - held across the generator's yields
    except OSError as exc:
        yield Item(name, 0, error=("unreadable", str(exc)))
        return
    with fo:
        if path.suffix.lower() in JSONL_SUFFIXES:
            yield from read_jsonl(fo, name)
        else:
            yield from read_avro(fo, name)


def read_path(path: Path) -> Iterator[Item]:
    """A file, or every file under a folder (sorted by relative name; hidden files skipped)."""
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            rel = p.relative_to(path)
            if p.is_file() and not any(part.startswith(".") for part in rel.parts):
                yield from read_file(p)
    elif path.exists():
        yield from read_file(path)
    else:
        yield Item(str(path), 0, error=("unreadable", "no such file or folder"))


def container_client(url: str, connection_string: str | None = None, ca_file: str | None = None) -> Any:
    """An ``azure.storage.blob.ContainerClient`` for a container URL (``https://<account>.blob.core.windows.net/
    <container>[/<prefix>][?<SAS>]``, or Azurite's path-style ``https://127.0.0.1:<port>/<account>/<container>``).
    With ``connection_string`` the account key authenticates and the container is the URL's container segment;
    otherwise the URL's SAS token (or public access). Returns (client, blob name prefix)."""
    from azure.storage.blob import BlobServiceClient, ContainerClient

    kwargs: dict[str, Any] = {"connection_verify": ca_file} if ca_file else {}
    parts = urlsplit(url)
    segments = [unquote(s) for s in parts.path.split("/") if s]
    path_style = parts.hostname in ("127.0.0.1", "localhost") or not (parts.hostname or "").count(".")
    if path_style:
        segments = segments[1:]  # the account name comes first in a path-style URL
    if not segments:
        raise ValueError(f"{url}: names no container")
    container, prefix = segments[0], "/".join(segments[1:])
    if connection_string:
        service = BlobServiceClient.from_connection_string(connection_string, **kwargs)
        return service.get_container_client(container), prefix
    base = f"{parts.scheme}://{parts.netloc}/{'/'.join(parts.path.split('/')[1:2]) + '/' if path_style else ''}"
    return ContainerClient.from_container_url(f"{base}{container}?{parts.query}", **kwargs), prefix


def read_container(client: Any, prefix: str = "") -> Iterator[Item]:
    """Every blob of a container (under ``prefix``) by name order, each downloaded to a temporary file first."""
    from azure.core.exceptions import AzureError

    label = getattr(client, "container_name", "container")
    for blob in client.list_blobs(name_starts_with=prefix or None):
        source = f"{label}/{blob.name}"
        fd, tmp = tempfile.mkstemp(prefix="ingest-", suffix=".blob")
        try:
            with os.fdopen(fd, "w+b") as fo:
                try:
                    client.download_blob(blob.name).readinto(fo)
                except AzureError as exc:
                    yield Item(source, 0, error=("unreadable", f"download failed: {exc}"[:300]))
                    continue
                fo.seek(0)
                reader = read_jsonl if Path(blob.name).suffix.lower() in JSONL_SUFFIXES else read_avro
                yield from reader(fo, source)
        finally:
            os.unlink(tmp)
