"""Minimal MQTT 3.1.1 packet codec for the fake hub (server side only: what a device sends and receives)."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

MAX_PACKET = 512 * 1024  # anything bigger than IoT Hub's limits plus headers is refused outright


class ProtocolError(Exception):
    """The peer broke MQTT 3.1.1; the connection is closed."""


@dataclass
class Packet:
    type: int
    flags: int
    body: bytes


@dataclass
class Connect:
    protocol: str
    level: int
    clean_session: bool
    keepalive: int
    client_id: str
    username: str | None
    password: str | None
    will_topic: str | None = None
    will_payload: bytes | None = None
    will_qos: int = 0


@dataclass
class Publish:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None = None
    props: dict[str, str] = field(default_factory=dict)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def encode(ptype: int, flags: int, body: bytes) -> bytes:
    return bytes([(ptype << 4) | flags]) + _varint(len(body)) + body


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


async def read_packet(reader: asyncio.StreamReader) -> Packet:
    first = await reader.readexactly(1)
    mult, length = 1, 0
    for _ in range(4):
        b = (await reader.readexactly(1))[0]
        length += (b & 0x7F) * mult
        if not b & 0x80:
            break
        mult *= 128
    else:
        raise ProtocolError("malformed remaining length")
    if length > MAX_PACKET:
        raise ProtocolError(f"packet of {length} bytes is over the limit")
    body = await reader.readexactly(length) if length else b""
    return Packet(first[0] >> 4, first[0] & 0x0F, body)


class _Cursor:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def u8(self) -> int:
        if self.pos >= len(self.data):
            raise ProtocolError("truncated packet")
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        if self.pos + 2 > len(self.data):
            raise ProtocolError("truncated packet")
        self.pos += 2
        return struct.unpack_from("!H", self.data, self.pos - 2)[0]

    def bin(self) -> bytes:
        n = self.u16()
        if self.pos + n > len(self.data):
            raise ProtocolError("truncated string")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def str(self) -> str:
        try:
            return self.bin().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("string is not UTF-8") from exc

    def rest(self) -> bytes:
        return self.data[self.pos :]


def parse_connect(p: Packet) -> Connect:
    c = _Cursor(p.body)
    proto, level, flags, keepalive = c.str(), c.u8(), c.u8(), c.u16()
    if flags & 0x01:
        raise ProtocolError("reserved CONNECT flag set")
    client_id = c.str()
    will_topic = will_payload = None
    will_qos = (flags >> 3) & 0x03
    if flags & 0x04:
        will_topic, will_payload = c.str(), c.bin()
    username = c.str() if flags & 0x80 else None
    password = c.bin().decode("utf-8", "replace") if flags & 0x40 else None
    return Connect(
        proto, level, bool(flags & 0x02), keepalive, client_id, username, password, will_topic, will_payload, will_qos
    )


def parse_publish(p: Packet) -> Publish:
    c = _Cursor(p.body)
    qos = (p.flags >> 1) & 0x03
    topic = c.str()
    pid = c.u16() if qos > 0 else None
    return Publish(topic, c.rest(), qos, bool(p.flags & 0x01), bool(p.flags & 0x08), pid)


def parse_subscribe(p: Packet) -> tuple[int, list[tuple[str, int]]]:
    if p.flags != 0x02:
        raise ProtocolError("SUBSCRIBE with wrong fixed-header flags")
    c = _Cursor(p.body)
    pid, subs = c.u16(), []
    while c.pos < len(c.data):
        subs.append((c.str(), c.u8() & 0x03))
    if not subs:
        raise ProtocolError("SUBSCRIBE without topic filters")
    return pid, subs


def parse_unsubscribe(p: Packet) -> tuple[int, list[str]]:
    c = _Cursor(p.body)
    pid, topics = c.u16(), []
    while c.pos < len(c.data):
        topics.append(c.str())
    return pid, topics


def packet_id(p: Packet) -> int:
    return _Cursor(p.body).u16()


def connack(session_present: bool, rc: int) -> bytes:
    return encode(CONNACK, 0, bytes([1 if session_present else 0, rc]))


def publish(topic: str, payload: bytes, qos: int = 0, pid: int | None = None, dup: bool = False) -> bytes:
    flags = (qos << 1) | (0x08 if dup else 0)
    body = _str(topic) + (struct.pack("!H", pid) if qos else b"") + payload
    return encode(PUBLISH, flags, body)


def puback(pid: int) -> bytes:
    return encode(PUBACK, 0, struct.pack("!H", pid))


def suback(pid: int, codes: list[int]) -> bytes:
    return encode(SUBACK, 0, struct.pack("!H", pid) + bytes(codes))


def unsuback(pid: int) -> bytes:
    return encode(UNSUBACK, 0, struct.pack("!H", pid))


def pingresp() -> bytes:
    return encode(PINGRESP, 0, b"")
