"""The association acceptor: one listening socket, one thread per connection, blocking sockets.

Threads, not asyncio: the per-instance work (fsyncs, the SQLite commit, sha256, file writes) releases
the GIL, and blocking reads handed straight to the application's sink (``Services.begin_instance``) are
the cheapest way to move the data set.
State per association is small (PS3.8's acceptor path): await A-ASSOCIATE-RQ -> accept or reject ->
P-DATA messages (``network_timeout`` between messages, ``dimse_timeout`` inside one) -> A-RELEASE-RQ
answered with RP, or A-ABORT / a dropped connection / a timeout. Anything that is not a valid PDU in
its place is logged and answered with A-ABORT; an association thread never takes the server down.

Availability (a port scanner or a slow client must never lock out a modality): a connection that has
not yet completed its A-ASSOCIATE-RQ is *pending*. Pending connections have a budget of their own
(``max_pending``; when it is full the oldest pending one is closed to make room) and never count
against ``max_associations``, which only established associations use. The ARTIM timer (PS3.8
9.1.5, state Sta2) runs once, from TCP accept to the last byte of the A-ASSOCIATE-RQ
(``acse_timeout``): it does not restart on each byte, and on expiry the connection is closed.
Established associations are shared fairly between addresses: when all ``max_associations`` are in use,
a request from an address holding none (or at least two fewer than another address) takes the place of
the busiest address's oldest *idle* association (between messages: nothing in flight, nothing
acknowledged is lost), which is aborted (``preemption_victim``). So one host holding every association
open (idle, or kept alive with a C-ECHO now and then) cannot keep a modality at another address out.
Socket timeouts are per read, so a peer sending a byte now and then would never let them expire: every
message (from its first byte, PDU header included, to its last) must also keep up a minimum average rate
(``min_message_rate``) once ``dimse_timeout`` has passed, or the association is aborted.
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

from appliance.core.logs import get_logger
from appliance.ingest.ul import dimse, pdu

log = get_logger(__name__)

DATA_CHUNK = 4 << 20  # at most this is read at once: a PDV's length claim is not trusted
MAX_COMMAND = 64 << 10  # a command set is a few hundred bytes
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_OUT_OF_RESOURCES = 0xA700


@dataclass(frozen=True)
class ServerConfig:
    """Limits of the acceptor; times in seconds, sizes in bytes."""

    max_associations: int  # established associations at once; more are rejected (transient, local limit)
    max_pdu: int  # our maximum receive length, announced in the AC; 0 = unlimited
    acse_timeout: float  # ARTIM: from TCP accept to a complete A-ASSOCIATE-RQ, once (PS3.8 9.1.5)
    dimse_timeout: float
    network_timeout: float
    max_instance_bytes: int = 1 << 30  # a larger data set is read and discarded, then refused
    max_pending: int = 16  # connections not yet associated; the oldest is closed when a new one needs room
    # bytes per second a message must average once dimse_timeout has passed since its first byte: a peer
    # trickling a byte now and then (which no per-read timeout catches) is aborted
    min_message_rate: float = 1024.0


class Services(Protocol):
    """What the application does with an association (the storage SCP implements it)."""

    def may_connect(self, host: str) -> bool:
        """False closes a new connection from ``host`` at once: no association could be admitted from
        that address, so it never takes a pending slot."""

    def admit(self, calling_ae: str, host: str) -> bool:
        """False rejects the association (calling AE not recognised)."""

    def begin_instance(
        self, assoc: Association, command: dimse.Command, transfer_syntax: str, prefix: bytes
    ) -> InstanceSink:
        """A C-STORE's data set starts (``prefix``: the Part-10 preamble and file meta for it); the
        returned sink takes the data set's bytes as they arrive."""

    def closed(self, assoc: Association, aborted: bool) -> None:
        """An established association ended (released, or aborted / dropped / timed out)."""


class InstanceSink(Protocol):
    """A data set being filed while it arrives (``Services.begin_instance`` returns one)."""

    def feed(self, chunk: bytes) -> None:
        """The next bytes of the data set, in order; the sink owns them."""

    def finish(self) -> tuple[int, str | None]:
        """The last fragment is in: (DIMSE status, error comment or None), once filed durably or not."""

    def discard(self) -> None:
        """The data set will never complete: leave nothing of it behind."""


class PeerAborted(Exception):
    pass


class ConnectionClosed(Exception):
    pass


class _Rejected(Exception):
    pass


class TooSlow(Exception):
    """A message arrived slower than ``min_message_rate`` once ``dimse_timeout`` had passed."""


class ArtimExpired(Exception):
    """The A-ASSOCIATE-RQ was not complete when the ARTIM timer ran out (PS3.8 9.1.5)."""


STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122  # PS3.7 C.4.2.1.6 / Annex C: Refused: SOP Class not supported


def negotiate(proposed: list[pdu.ProposedContext], supported: Mapping[str, tuple[str, ...]]) -> list[pdu.ContextResult]:
    """One result per proposed context: the first of *our* preferred syntaxes the requestor offers.

    A malformed proposal is answered with its ``defect`` (PS3.8 Table 9-18); the others are
    negotiated as usual.
    """
    results = []
    for cx in sorted(proposed, key=lambda c: c.context_id):
        if cx.defect is not None:
            fallback = cx.transfer_syntaxes[0] if cx.transfer_syntaxes else pdu.IMPLICIT_VR_LITTLE_ENDIAN
            results.append(pdu.ContextResult(cx.context_id, cx.defect, fallback))
            continue
        ours = supported.get(cx.abstract_syntax)
        if ours is None:
            results.append(pdu.ContextResult(cx.context_id, pdu.ABSTRACT_SYNTAX_NOT_SUPPORTED, cx.transfer_syntaxes[0]))
            continue
        ts = next((t for t in ours if t in cx.transfer_syntaxes), None)
        if ts is None:
            results.append(
                pdu.ContextResult(cx.context_id, pdu.TRANSFER_SYNTAXES_NOT_SUPPORTED, cx.transfer_syntaxes[0])
            )
        else:
            results.append(pdu.ContextResult(cx.context_id, pdu.ACCEPTANCE, ts))
    return results


class Association:
    """One connection from a requestor, served by its own thread (``run``)."""

    def __init__(
        self, server: AssociationServer, sock: socket.socket, peer: tuple[str, int], accepted_at: float | None = None
    ):
        self.server = server
        self.sock = sock
        self.peer_host = str(peer[0])
        self.accepted_at = time.monotonic() if accepted_at is None else accepted_at  # ARTIM starts here
        self.calling_ae = ""
        self.called_ae = ""
        self.peer_max_pdu = 0
        self.contexts: dict[int, str] = {}  # accepted context id -> transfer syntax
        self.abstract_syntaxes: dict[int, str] = {}  # accepted context id -> its abstract syntax (SOP class)
        rfile = sock.makefile("rb", buffering=1 << 16)
        assert isinstance(rfile, io.BufferedReader)  # buffered, so read1 returns what one recv got
        self._rfile = rfile
        self._send_lock = threading.Lock()
        self._timeout: float | None = None
        self._stopping = False
        # the DIMSE message being received
        self._command_buf = bytearray()
        self._command_ctx: int | None = None
        self._command: dimse.Command | None = None
        self._sink: InstanceSink | None = None  # the services file the data set as it arrives
        self._received = 0  # bytes of the current instance (Part-10 prefix included)
        # the current data set is drained and then refused with this (status, comment): too large, or
        # a SOP class other than its presentation context's
        self._refusal: tuple[int, str] | None = None
        self._preempted = False  # aborted to make room for an association from another address
        # the message being received: monotonic time of its first byte (None between messages) and its bytes
        self._message_start: float | None = None
        self._message_bytes = 0

    def idle(self) -> bool:
        """True between DIMSE messages: no command or data set is being received, so aborting the
        association loses nothing that was (or is about to be) acknowledged."""
        return (
            not self._stopping
            and self._command_ctx is None
            and self._command is None
            and self._sink is None
            and self._refusal is None
            and not self._command_buf
        )

    # --- I/O ---------------------------------------------------------------------------------
    def _set_timeout(self, seconds: float) -> None:
        if seconds != self._timeout:
            self.sock.settimeout(seconds)
            self._timeout = seconds

    def _read(self, n: int) -> bytes:
        """Exactly ``n`` bytes (ConnectionClosed if the peer closes first). Each piece that arrives counts
        towards the current message's rate (``_progress``)."""
        parts: list[bytes] = []
        got = 0
        while got < n:
            chunk = self._rfile.read1(n - got)
            if not chunk:
                raise ConnectionClosed()
            parts.append(chunk)
            got += len(chunk)
            self._progress(len(chunk))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _progress(self, n: int) -> None:
        """``n`` more bytes of the current message arrived (the first byte starts it); raises TooSlow once
        more than ``dimse_timeout`` has passed since its start and it averages below ``min_message_rate``."""
        now = time.monotonic()
        if self._message_start is None:
            self._message_start, self._message_bytes = now, 0
        self._message_bytes += n
        cfg = self.server.cfg
        late = now - self._message_start - cfg.dimse_timeout
        if late > 0 and self._message_bytes < cfg.min_message_rate * late:
            raise TooSlow(
                f"{self._message_bytes} bytes in {now - self._message_start:.1f} s"
                f" (at least {cfg.min_message_rate:.0f} B/s after the first {cfg.dimse_timeout:g} s)"
            )

    def _read_by(self, deadline: float, n: int) -> bytes:
        """``n`` bytes read before ``deadline`` (monotonic), however slowly they trickle in; raises
        ArtimExpired when the deadline passes first. Reads the socket directly (exactly ``n`` bytes,
        nothing buffered ahead), so the buffered reader takes over cleanly afterwards."""
        buf = bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ArtimExpired()
            self.sock.settimeout(left)
            self._timeout = None  # the next _set_timeout applies its value
            try:
                chunk = self.sock.recv(min(n - len(buf), 1 << 16))
            except TimeoutError:
                raise ArtimExpired() from None
            if not chunk:
                raise ConnectionClosed()
            buf += chunk
        return bytes(buf)

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def drop(self) -> None:
        """Close a connection that never became an association (no A-ABORT: PS3.8 Sta2, AA-2)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def preempt(self) -> None:
        """Abort this idle association (A-ABORT, service-provider) to make room for another address's."""
        self._preempted = True
        self.abort(pdu.SOURCE_PROVIDER, pdu.REASON_NOT_SPECIFIED)

    def abort(self, source: int = pdu.SOURCE_USER, reason: int = pdu.REASON_NOT_SPECIFIED) -> None:
        """Send A-ABORT and cut the connection (safe from any thread; the association's thread exits)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._send(pdu.encode_abort(source, reason))
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    # --- the association's life ------------------------------------------------------------------
    def run(self) -> None:
        established = released = False
        try:
            deadline = self.accepted_at + self.server.cfg.acse_timeout  # ARTIM, started at accept
            kind, length = pdu.HEADER.unpack(self._read_by(deadline, pdu.HEADER.size))
            if kind != pdu.ASSOCIATE_RQ:
                raise pdu.PDUError(f"PDU 0x{kind:02X} before A-ASSOCIATE-RQ", pdu.REASON_UNEXPECTED_PDU)
            if length > pdu.MAX_CONTROL_PDU:
                raise pdu.PDUError(f"PDU length {length} beyond the {pdu.MAX_CONTROL_PDU}-byte limit")
            self._negotiate(pdu.parse_associate_rq(self._read_by(deadline, length)))
            established = True
            self._serve()
            released = True
        except _Rejected:
            pass
        except ArtimExpired:
            log.warning(
                "connection closed: no complete A-ASSOCIATE-RQ before the ARTIM timer expired",
                peer=self.peer_host,
                artim_s=self.server.cfg.acse_timeout,
            )
        except PeerAborted as exc:
            log.warning("association aborted; any partly received instance is discarded", **self._who(), abort=str(exc))
        except (ConnectionClosed, ConnectionError):
            if not established:
                log.debug("connection closed before an association was established", peer=self.peer_host)
            elif self._preempted:
                log.warning("idle association aborted to make room for another address", **self._who())
            elif self._stopping:
                log.warning("association aborted at shutdown", **self._who())
            else:
                log.warning(
                    "association aborted; any partly received instance is discarded",
                    **self._who(),
                    abort="connection dropped",
                )
        except TimeoutError:
            log.warning("association timed out; aborted", **self._who(), timeout_s=self._timeout)
            self.abort(pdu.SOURCE_PROVIDER, pdu.REASON_NOT_SPECIFIED)
        except TooSlow as exc:
            log.warning("message arriving too slowly; association aborted", **self._who(), rate=str(exc))
            self.abort(pdu.SOURCE_PROVIDER, pdu.REASON_NOT_SPECIFIED)
        except (pdu.PDUError, dimse.CommandError) as exc:
            reason = getattr(exc, "reason", pdu.REASON_INVALID_PARAMETER)
            log.warning("malformed PDU; association aborted", **self._who(), error=str(exc))
            self.abort(pdu.SOURCE_PROVIDER, reason)
        except OSError as exc:
            log.warning("association ended by a network error", **self._who(), error=str(exc))
        except Exception:
            log.exception("association failed; aborted", **self._who())
            self.abort(pdu.SOURCE_PROVIDER, pdu.REASON_NOT_SPECIFIED)
        finally:
            self._drop_partial()
            with contextlib.suppress(OSError):
                self._rfile.close()
                self.sock.close()
            self.server._forget(self)
            if established:
                try:
                    self.server.services.closed(self, aborted=not released)
                except Exception:
                    log.exception("association close hook failed", **self._who())

    def _drop_partial(self) -> None:
        """A data set cut off by the association's end is discarded, with anything filed of it."""
        sink, self._sink = self._sink, None
        if sink is not None:
            try:
                sink.discard()
            except Exception:
                log.exception("could not discard a partial instance", **self._who())

    def _who(self) -> dict[str, str]:
        return {"calling_ae": self.calling_ae, "peer": self.peer_host}

    def _read_control_body(self, length: int) -> bytes:
        if length > pdu.MAX_CONTROL_PDU:
            raise pdu.PDUError(f"PDU length {length} beyond the {pdu.MAX_CONTROL_PDU}-byte limit")
        return self._read(length)

    def _negotiate(self, rq: pdu.AssociateRequest) -> None:
        self.calling_ae, self.called_ae = rq.calling_ae, rq.called_ae
        if not rq.protocol_version & pdu.PROTOCOL_VERSION_1:
            log.warning(
                "association rejected: protocol version not supported", **self._who(), version=rq.protocol_version
            )
            self._reject(0x01, 0x02, 0x02)  # permanent, service-provider (ACSE), protocol-version not supported
        if rq.ignored_items:
            log.debug("unknown A-ASSOCIATE-RQ items ignored", **self._who(), items=sorted(set(rq.ignored_items)))
        if rq.duplicate_context_ids:
            log.warning(
                "presentation context IDs proposed twice: only the first proposal negotiated",
                **self._who(),
                context_ids=sorted(set(rq.duplicate_context_ids)),
            )
        if not self.server.services.admit(rq.calling_ae, self.peer_host):
            self._reject(0x01, 0x01, 0x03)  # permanent, service-user, calling AE title not recognised
        if rq.application_context != pdu.APPLICATION_CONTEXT:
            log.warning(
                "association rejected: unknown application context", **self._who(), context=rq.application_context
            )
            self._reject(0x01, 0x01, 0x02)
        if not self.server._establish(self):
            log.warning(
                "association rejected: too many associations", **self._who(), limit=self.server.cfg.max_associations
            )
            self._reject(0x02, 0x03, 0x02)  # transient, service-provider (presentation), local limit exceeded
        results = negotiate(rq.contexts, self.server.contexts)
        self.contexts = {r.context_id: r.transfer_syntax for r in results if r.result == pdu.ACCEPTANCE}
        proposed = {cx.context_id: cx.abstract_syntax for cx in rq.contexts}
        self.abstract_syntaxes = {cid: proposed[cid] for cid in self.contexts}
        self.peer_max_pdu = rq.max_pdu
        self._send(pdu.encode_associate_ac(rq, results, self.server.cfg.max_pdu))
        log.debug(
            "association accepted",
            **self._who(),
            contexts=len(self.contexts),
            proposed=len(rq.contexts),
            peer_max_pdu=rq.max_pdu,
        )

    def _reject(self, result: int, source: int, reason: int) -> None:
        with contextlib.suppress(OSError):
            self._send(pdu.encode_associate_rj(result, source, reason))
        raise _Rejected()

    def _serve(self) -> None:
        """Receive P-DATA until A-RELEASE-RQ (returns) or anything else that ends the association (raises)."""
        max_pdu = self.server.cfg.max_pdu
        cfg = self.server.cfg
        while True:
            in_message = self._command_ctx is not None or self._command is not None
            if not in_message:
                self._message_start = None  # the next message's clock starts with its first byte
            self._set_timeout(cfg.dimse_timeout if in_message else cfg.network_timeout)
            kind, length = pdu.HEADER.unpack(self._read(pdu.HEADER.size))
            if kind == pdu.P_DATA_TF:
                if max_pdu and length > max_pdu:
                    raise pdu.PDUError(f"P-DATA-TF of {length} bytes beyond our maximum {max_pdu}")
                self._receive_pdvs(length)
            elif kind == pdu.RELEASE_RQ:
                self._read_control_body(length)
                self._send(pdu.encode_release_rp())
                if in_message:
                    log.warning("association released mid-message; partial instance discarded", **self._who())
                return
            elif kind == pdu.ABORT:
                source, reason = pdu.parse_abort(self._read_control_body(length))
                raise PeerAborted(f"A-ABORT source {source} reason {reason}")
            elif kind in pdu.KNOWN_TYPES:
                raise pdu.PDUError(
                    f"unexpected PDU 0x{kind:02X} in an established association", pdu.REASON_UNEXPECTED_PDU
                )
            else:
                raise pdu.PDUError(f"unrecognised PDU type 0x{kind:02X}", pdu.REASON_UNRECOGNIZED_PDU)

    def _receive_pdvs(self, length: int) -> None:
        remaining = length
        while remaining:
            if remaining < pdu.PDV_HEADER.size:
                raise pdu.PDUError(f"P-DATA-TF with {remaining} stray bytes after its last PDV")
            item_len, ctx, control = pdu.PDV_HEADER.unpack(self._read(pdu.PDV_HEADER.size))
            size = item_len - 2
            if item_len < 2 or size > remaining - pdu.PDV_HEADER.size:
                raise pdu.PDUError(f"PDV length {item_len} does not fit its P-DATA-TF ({remaining} bytes left)")
            remaining -= pdu.PDV_HEADER.size + size
            if ctx not in self.contexts:
                raise pdu.PDUError(f"PDV for presentation context {ctx}, which was not accepted")
            last = bool(control & 0x02)
            if control & 0x01:
                self._command_fragment(ctx, size, last)
            else:
                self._data_fragment(ctx, size, last)

    def _command_fragment(self, ctx: int, size: int, last: bool) -> None:
        if self._command is not None:
            raise pdu.PDUError("command fragment while a data set was expected", pdu.REASON_UNEXPECTED_PARAMETER)
        if self._command_ctx not in (None, ctx):
            raise pdu.PDUError("command fragments on two presentation contexts", pdu.REASON_UNEXPECTED_PARAMETER)
        if len(self._command_buf) + size > MAX_COMMAND:
            raise pdu.PDUError(f"command set longer than {MAX_COMMAND} bytes")
        self._command_ctx = ctx
        self._command_buf += self._read(size)
        if not last:
            return
        command = dimse.decode_command(self._command_buf)
        self._command_buf = bytearray()
        if command.field == dimse.C_ECHO_RQ and not command.has_data_set:
            self._command_ctx = None
            self._respond(ctx, dimse.C_ECHO_RSP, command, 0x0000, None)
        elif command.field == dimse.C_STORE_RQ and command.has_data_set:
            self._command = command
            if command.sop_class_uid != self.abstract_syntaxes[ctx]:
                # PS3.7/PS3.8: a message belongs to its presentation context's abstract syntax; an instance
                # of a class that was not accepted (perhaps proposed and rejected) is drained and refused.
                log.warning(
                    "instance refused: SOP class not accepted on its presentation context",
                    **self._who(),
                    sop_class=command.sop_class_uid,
                    context_id=ctx,
                    context_sop_class=self.abstract_syntaxes[ctx],
                )
                self._refusal = (STATUS_SOP_CLASS_NOT_SUPPORTED, "SOP class not accepted on this presentation context")
                return
            ts = self.contexts[ctx]
            prefix = dimse.part10_prefix(command.sop_class_uid, command.sop_instance_uid, ts)
            self._received = len(prefix)
            self._sink = self.server.services.begin_instance(self, command, ts, prefix)
        else:
            raise dimse.CommandError(
                f"unsupported DIMSE command 0x{command.field:04X} (data set: {command.has_data_set})"
            )

    def _data_fragment(self, ctx: int, size: int, last: bool) -> None:
        sink = self._sink
        if self._command is None or ctx != self._command_ctx or (sink is None and self._refusal is None):
            raise pdu.PDUError("data set fragment without its command", pdu.REASON_UNEXPECTED_PARAMETER)
        limit = self.server.cfg.max_instance_bytes
        if self._refusal is None and self._received + size > limit:
            log.warning(
                "instance refused: data set too large",
                **self._who(),
                sop_uid=self._command.sop_instance_uid,
                max_instance_bytes=limit,
            )
            self._refusal = (STATUS_OUT_OF_RESOURCES, "data set too large")
        if self._refusal is not None:
            # Refused: drain the rest of the data set without keeping it, then answer the refusal.
            if sink is not None:  # what was filed of it so far is removed
                self._sink = None
                sink.discard()
            while size:
                step = min(size, DATA_CHUNK)
                self._read(step)
                size -= step
        else:
            assert sink is not None
            while size:  # each piece goes to the sink as it arrives, in bounded steps
                step = min(size, DATA_CHUNK)
                sink.feed(self._read(step))
                self._received += step
                size -= step
        if not last:
            return
        command, refusal = self._command, self._refusal
        self._command, self._command_ctx, self._sink, self._refusal = None, None, None, None
        if refusal is not None:
            self._respond(ctx, dimse.C_STORE_RSP, command, *refusal)
            return
        assert sink is not None
        try:
            status, comment = sink.finish()
        except Exception:
            log.exception("store handler failed", **self._who(), sop_uid=command.sop_instance_uid)
            status, comment = STATUS_PROCESSING_FAILURE, "internal error"
        self._respond(ctx, dimse.C_STORE_RSP, command, status, comment)

    def _respond(self, ctx: int, field: int, rq: dimse.Command, status: int, comment: str | None) -> None:
        rsp = dimse.encode_response(
            field,
            rq.message_id,
            rq.sop_class_uid or dimse.VERIFICATION,
            status,
            sop_instance_uid=rq.sop_instance_uid if field == dimse.C_STORE_RSP else None,
            error_comment=comment if status != 0 else None,
        )
        self._send(pdu.encode_p_data(ctx, rsp, True, self.peer_max_pdu))


class _Pending(Protocol):
    peer_host: str


P = TypeVar("P", bound=_Pending)


def eviction_victim(pending: list[P]) -> P:
    """Which pending connection (oldest first in ``pending``) to close for a new one: the oldest of the
    peer address holding the most pending connections. A flood from one address then only displaces
    its own connections, never a modality's single pending one from another address."""
    counts = Counter(c.peer_host for c in pending)
    busiest = max(counts.values())
    return next(c for c in pending if counts[c.peer_host] == busiest)


class _Established(Protocol):
    peer_host: str

    def idle(self) -> bool: ...


E = TypeVar("E", bound=_Established)


def preemption_victim(established: list[E], host: str) -> E | None:
    """Which established association (oldest first in ``established``) to abort for a new request from
    ``host`` when every association is in use; None rejects the request.

    The victim is the oldest *idle* association (``idle()``: between messages) of another address, the one
    holding the most associations among those with an idle one, provided ``host`` holds none yet, or that
    address holds at least two more than ``host`` does (so two addresses that both hold some never take
    slots back and forth, and an address asking again never displaces its own). An association receiving
    a message is never chosen."""
    counts = Counter(a.peer_host for a in established)
    mine = counts.get(host, 0)
    idle = [a for a in established if a.peer_host != host and a.idle()]
    if not idle:
        return None
    busiest = max(counts[a.peer_host] for a in idle)
    if mine and busiest < mine + 2:
        return None
    return next(a for a in idle if counts[a.peer_host] == busiest)


class AssociationServer:
    """Accepts connections on ``(bind, port)`` and runs each in its own thread.

    A connection is *pending* from accept until its A-ASSOCIATE-RQ is accepted, then *established*.
    At most ``cfg.max_pending`` are pending: a new connection beyond that closes the oldest pending
    one of the busiest peer address (``eviction_victim``; a modality completes its request in
    milliseconds, an idle probe or a flood is what goes). At
    most ``cfg.max_associations`` are established; pending ones never count against that limit. When
    they are all in use, a request may take an idle one's place (``preemption_victim``).
    """

    def __init__(
        self,
        address: tuple[str, int],
        cfg: ServerConfig,
        contexts: Mapping[str, tuple[str, ...]],
        services: Services,
    ):
        self.cfg = cfg
        self.contexts = contexts
        self.services = services
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._listener = socket.create_server(address, family=family, backlog=64)
        self._listener.settimeout(0.2)  # accept() polls the stop flag this often
        self._pending: dict[Association, None] = {}  # insertion-ordered: the oldest first
        self._established: dict[Association, None] = {}  # insertion-ordered: the oldest first
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return (str(host), int(port))

    def count(self) -> int:
        """Established associations."""
        with self._lock:
            return len(self._established)

    def pending(self) -> int:
        """Connections that have not (yet) completed an A-ASSOCIATE-RQ."""
        with self._lock:
            return len(self._pending)

    def listening(self) -> bool:
        """True while the accept loop runs (started and neither stopped nor crashed)."""
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._accept_loop, name="dicom-accept", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    return
                log.error("accept failed", error=str(exc))
                time.sleep(0.1)
                continue
            accepted_at = time.monotonic()
            if not self.services.may_connect(str(peer[0])):
                with contextlib.suppress(OSError):
                    sock.close()
                continue
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # else each response waits ~40 ms
            assoc = Association(self, sock, peer, accepted_at)
            thread = threading.Thread(target=assoc.run, name=f"assoc-{peer[0]}:{peer[1]}", daemon=True)
            evicted: list[Association] = []
            with self._lock:
                while len(self._pending) >= max(1, self.cfg.max_pending):
                    victim = eviction_victim(list(self._pending))
                    del self._pending[victim]
                    evicted.append(victim)
                self._pending[assoc] = None
                self._threads.add(thread)
            for old in evicted:
                log.warning(
                    "pending connection closed to make room: too many connections without an association",
                    peer=old.peer_host,
                    max_pending=self.cfg.max_pending,
                )
                old.drop()
            thread.start()

    def _establish(self, assoc: Association) -> bool:
        """Move a pending connection to the established ones; False when ``max_associations`` are in use
        and none may be taken over (``preemption_victim``). A victim is aborted (A-ABORT)."""
        victim: Association | None = None
        with self._lock:
            if len(self._established) >= self.cfg.max_associations:
                victim = preemption_victim(list(self._established), assoc.peer_host)
                if victim is None:
                    return False
                del self._established[victim]
            self._pending.pop(assoc, None)
            self._established[assoc] = None
        if victim is not None:
            log.warning(
                "association limit reached: an idle association of the busiest address makes room",
                peer=victim.peer_host,
                calling_ae=victim.calling_ae,
                for_peer=assoc.peer_host,
                limit=self.cfg.max_associations,
            )
            victim.preempt()
        return True

    def _forget(self, assoc: Association) -> None:
        with self._lock:
            self._pending.pop(assoc, None)
            self._established.pop(assoc, None)
            self._threads.discard(threading.current_thread())

    def stop(self, grace_s: float) -> int:
        """Stop accepting, close pending connections, let associations finish for up to ``grace_s``,
        abort the rest; returns how many were aborted."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._listener.close()
        with self._lock:
            pending = list(self._pending)
        for conn in pending:
            conn.drop()
        deadline = time.monotonic() + grace_s
        while self.count() and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            left, threads = list(self._established), list(self._threads)
        for assoc in left:
            assoc.abort()
        for thread in threads:
            thread.join(timeout=5)
        return len(left)
