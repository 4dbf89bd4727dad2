"""In-process pieces of the listener's defences (issue 11): which pending connection gives way, which
addresses may connect at all, the encoding check on a data set's first element, the watchdog period."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from appliance.app.daemon import watchdog_interval
from appliance.core.config import AllowedCaller, DicomConfig
from appliance.ingest.header import STATUS_ENCODING_MISMATCH, MalformedInstance, check_encoding
from appliance.ingest.scp import address_allowed
from appliance.ingest.ul.server import eviction_victim, preemption_victim


@dataclass(frozen=True)
class Conn:
    peer_host: str
    n: int


def test_eviction_takes_the_oldest_of_the_busiest_address() -> None:
    modality = Conn("192.168.10.21", 0)
    flood = [Conn("10.6.6.6", i) for i in range(1, 6)]
    other = Conn("10.7.7.7", 6)
    assert eviction_victim([modality, *flood, other]) == flood[0]  # the modality's older connection stays
    assert eviction_victim([modality, other]) == modality  # a tie: the oldest overall
    assert eviction_victim([Conn("h", 0)]) == Conn("h", 0)


@dataclass(frozen=True)
class Assoc:
    peer_host: str
    n: int
    between_messages: bool = True

    def idle(self) -> bool:
        return self.between_messages


def test_preemption_takes_the_oldest_idle_of_the_busiest_address_only_from_another() -> None:
    hog = [Assoc("10.6.6.6", 0, between_messages=False), Assoc("10.6.6.6", 1), Assoc("10.6.6.6", 2)]
    pacs = Assoc("192.168.10.5", 3)
    assert preemption_victim([*hog, pacs], "192.168.10.21") == hog[1]  # receiving a message: never taken
    assert preemption_victim([*hog, pacs], "10.6.6.6") is None  # an address never displaces its own
    assert preemption_victim([*hog, pacs], "192.168.10.5") == hog[1]  # 3 >= 1 + 2
    two = [Assoc("a", 0), Assoc("a", 1), Assoc("b", 2)]
    assert preemption_victim(two, "b") is None  # 2 < 1 + 2: no taking slots back and forth
    assert preemption_victim([Assoc("a", 0, False), Assoc("a", 1, False)], "b") is None  # nothing idle
    assert preemption_victim([Assoc("a", 0)], "b") == Assoc("a", 0)  # an address holding none gets the idle one
    assert preemption_victim([Assoc("a", 0), Assoc("b", 1)], "c") == Assoc("a", 0)  # a tie: the oldest


def test_address_allowed_only_where_some_entry_could_admit() -> None:
    cfg = DicomConfig(
        allowlist_enabled=True,
        allowed_callers=[
            AllowedCaller(ae_title="CR1", host="192.168.1.0/24"),
            AllowedCaller(ae_title="CT", host="::1"),
        ],
    )
    assert address_allowed(cfg, "192.168.1.77") and address_allowed(cfg, "::1")
    assert not address_allowed(cfg, "192.168.2.1") and not address_allowed(cfg, "not-an-address")
    anywhere = DicomConfig(allowlist_enabled=True, allowed_callers=[AllowedCaller(ae_title="ANY")])
    assert address_allowed(anywhere, "8.8.8.8")
    assert address_allowed(DicomConfig(), "8.8.8.8")  # allowlist off


def _element(tag: tuple[int, int], vr: bytes | None, value: bytes, little: bool = True) -> bytes:
    order = "<" if little else ">"
    head = struct.pack(f"{order}HH", *tag)
    if vr is None:
        return head + struct.pack(f"{order}I", len(value)) + value
    return head + vr + struct.pack(f"{order}H", len(value)) + value


SPECIFIC_CHARSET = (0x0008, 0x0005)


@pytest.mark.parametrize(
    ("first", "syntax", "mismatch"),
    [
        (_element(SPECIFIC_CHARSET, b"CS", b"ISO_IR 100"), ExplicitVRLittleEndian, None),
        (_element(SPECIFIC_CHARSET, None, b"ISO_IR 100"), ImplicitVRLittleEndian, None),
        (_element(SPECIFIC_CHARSET, b"CS", b"ISO_IR 100", little=False), ExplicitVRBigEndian, None),
        (_element(SPECIFIC_CHARSET, None, b"ISO_IR 100"), ExplicitVRLittleEndian, "implicit VR"),
        (_element(SPECIFIC_CHARSET, b"CS", b"ISO_IR 100"), ImplicitVRLittleEndian, "explicit VR"),
        (_element(SPECIFIC_CHARSET, b"CS", b"ISO_IR 100", little=False), ExplicitVRLittleEndian, "big endian"),
        (_element(SPECIFIC_CHARSET, b"CS", b"ISO_IR 100"), ExplicitVRBigEndian, "little endian"),
        (_element((0x0002, 0x0010), b"UI", b"1.2.840.10008.1.2\0"), ExplicitVRLittleEndian, None),  # meta sent along
        (b"\xde\xad\xbe\xef" * 4, ExplicitVRLittleEndian, None),  # garbage: left to the parse (0xC210)
        (b"\x00" * 16, ExplicitVRLittleEndian, None),
        (_element((0x0010, 0x0010), b"PN", b"A^B "), ExplicitVRLittleEndian, None),  # no group 0008: the parse decides
        (_element(SPECIFIC_CHARSET, None, b"ISO_IR 100"), DeflatedExplicitVRLittleEndian, None),  # not checked
        (b"\x08\x00\x05", ExplicitVRLittleEndian, None),  # too short to tell
    ],
)
def test_check_encoding(first: bytes, syntax: str, mismatch: str | None) -> None:
    if mismatch is None:
        check_encoding(first, syntax)
        return
    with pytest.raises(MalformedInstance, match=mismatch) as exc:
        check_encoding(first, syntax)
    assert exc.value.status == STATUS_ENCODING_MISMATCH == 0xC213


def test_watchdog_interval_is_a_quarter_of_watchdog_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "sixty"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert watchdog_interval() is None
