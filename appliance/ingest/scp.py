"""The C-ECHO / C-STORE SCP: the box's front door for modalities.

Hot path of one C-STORE: disk guard -> a spool file from the reserve (its directory entry already
durable, see ``spool``) -> while the fragments arrive, the association's thread writes them into it
(the data set exactly as received, never decoded or re-encoded) and a worker hashes them and reads
the header from the prefix (``StreamedInstance``) -> at the last fragment: the worker fsyncs the file
*while* the handler checks the tail and commits the row (``records``, synchronous=FULL) -> 0x0000
once both are durable. Any failure answers a failure status, so nothing is acknowledged that is not
on disk; a row whose file never became durable is removed (now, or at startup: ``durability``)."""

from __future__ import annotations

import ctypes
import hashlib
import ipaddress
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue
from typing import Any

from appliance.core.config import DicomConfig
from appliance.core.logs import get_logger
from appliance.core.store import Store
from appliance.ingest import records
from appliance.ingest.assembler import StudyAssembler
from appliance.ingest.contexts import scp_contexts
from appliance.ingest.durability import Watermark, verify_after, write_watermark
from appliance.ingest.header import (
    EarlyHeader,
    InstanceHeader,
    MalformedInstance,
    NotStreamable,
    check_tail,
    parse_header,
    parse_header_prefix,
    tail_is_exact,
)
from appliance.ingest.spool import Spool, SpoolFile, read_all, write_all
from appliance.ingest.ul.dimse import Command
from appliance.ingest.ul.server import Association, AssociationServer, ServerConfig
from durable import replace_durably

log = get_logger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # disk below the configured floor: refused before storing
STATUS_WRITE_FAILED = 0xA701  # could not write or record (disk full, I/O error)
STATUS_PROCESSING_FAILURE = 0x0110


def caller_allowed(cfg: DicomConfig, calling_ae: str, host: str) -> bool:
    """True when the allowlist is off, or some entry matches the calling AE title and the peer address."""
    if not cfg.allowlist_enabled:
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    for entry in cfg.allowed_callers:
        if entry.ae_title.strip() != calling_ae.strip():
            continue
        if entry.host is None or addr in ipaddress.ip_network(entry.host, strict=False):
            return True
    return False


def address_allowed(cfg: DicomConfig, host: str) -> bool:
    """True when the allowlist is off, or some entry could admit a caller from ``host`` (an entry
    without ``host`` admits every address)."""
    if not cfg.allowlist_enabled:
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(e.host is None or addr in ipaddress.ip_network(e.host, strict=False) for e in cfg.allowed_callers)


def _not_stored(exc: Exception, sop_uid: str) -> tuple[int, str]:
    """The failure status for an instance that could not be filed (nothing of it was acked)."""
    if isinstance(exc, OSError):
        log.error("instance not stored: write failed", sop_uid=sop_uid, error=str(exc))
        return STATUS_WRITE_FAILED, "could not write or record the instance"
    log.error("instance not stored: internal error", sop_uid=sop_uid, exc_info=exc)
    return STATUS_PROCESSING_FAILURE, "internal error"


@dataclass(frozen=True)
class StoredInstance:
    """What ``StorageSCP.on_instance`` hooks get once an instance is durable (file, directory, row)."""

    study_id: int
    path: Path  # absolute spool path
    sha256: str
    header: InstanceHeader

    @property
    def modality(self) -> str | None:
        """Modality (0008,0060) from the header, None when absent."""
        return self.header.modality


class StorageSCP:
    """Service: listens for associations (``ul.server``) and files every accepted instance durably."""

    name = "dicom-scp"

    def __init__(self, cfg: DicomConfig, store: Store, spool: Spool, assembler: StudyAssembler | None = None):
        self.cfg = cfg
        self.store = store
        self.spool = spool
        self.assembler = assembler
        self._server: AssociationServer | None = None
        self._assoc_studies: dict[int, set[int]] = {}
        self._lock = threading.Lock()
        self.watermark_path = self.store.path.with_name("ingest.watermark")
        self.watermark = Watermark(self.watermark_path, 0)
        self._flusher = self._make_flusher()
        self._flusher_down = False  # shut down by stop(): start() makes a new one
        # Called in the association thread after each new instance is durable, before its ACK is sent:
        # a hook must only enqueue (e.g. the pipeline's early preparation); one that raises is logged.
        self.on_instance: list[Callable[[StoredInstance], None]] = []

    # --- lifecycle -------------------------------------------------------------------------------
    def _make_flusher(self) -> ThreadPoolExecutor:
        """Per in-flight instance: its stream worker (header parse, sha256, spool writes while the
        fragments arrive; or the header parse beside the handler's sha256), then its file fsync
        (beside the handler's commit): at most two tasks per association."""
        return ThreadPoolExecutor(max_workers=2 * self.cfg.max_associations, thread_name_prefix="fsync")

    def recover(self) -> None:
        """Startup: rows above the durability watermark whose file is not intact were never
        acknowledged (dropped); no association survives a restart; files without a row were never
        acknowledged (removed). Then the watermark is moved to the newest row."""
        upto = Watermark.read(self.watermark_path)
        checked, dropped = verify_after(self.store, self.spool, upto)
        reset = records.reset_open_associations(self.store)
        removed = self.spool.sweep(records.known_paths(self.store))
        top = records.max_instance_id(self.store)
        write_watermark(self.watermark_path, top)
        self.watermark = Watermark(self.watermark_path, top)
        if dropped or reset or removed:
            log.info(
                "recovered after unclean stop",
                rows_checked=checked,
                rows_dropped=dropped,
                studies_reset=reset,
                spool_files_removed=removed,
            )

    def start(self) -> None:
        self.recover()
        if self._flusher_down:  # restarted after stop()
            self._flusher, self._flusher_down = self._make_flusher(), False
        cfg = self.cfg
        server_cfg = ServerConfig(
            max_associations=cfg.max_associations,
            max_pdu=cfg.max_pdu,
            acse_timeout=cfg.acse_timeout,
            dimse_timeout=cfg.dimse_timeout,
            network_timeout=cfg.network_timeout,
            max_instance_bytes=cfg.max_instance_bytes,
            max_pending=cfg.max_pending_connections,
        )
        # The called AE title is not checked: modalities are often configured with a sloppy one.
        self._server = AssociationServer((cfg.bind, cfg.port), server_cfg, scp_contexts(cfg.accept_all_storage), self)
        self.spool.start()
        self._server.start()
        self.watermark.start()
        host, port = self.address
        log.info("DICOM SCP listening", ae_title=cfg.ae_title, host=host, port=port)

    @property
    def address(self) -> tuple[str, int]:
        return self._server.address if self._server is not None else (self.cfg.bind, self.cfg.port)

    @property
    def listening(self) -> bool:
        """True between a successful ``start`` and ``stop``: associations are being accepted."""
        return self._server is not None

    def active_associations(self) -> int:
        return self._server.count() if self._server is not None else 0

    def status(self) -> dict[str, Any]:
        host, port = self.address
        return {"ae_title": self.cfg.ae_title, "host": host, "port": port}

    def health(self) -> str | None:
        """None while the listener accepts connections and ``state.db`` takes a write lock; else what is
        wrong (one line, for the service manager's watchdog and the logs)."""
        server = self._server
        if server is None or not server.listening():
            return "DICOM listener not running"
        return self.store.write_problem()

    def stop(self) -> None:
        """Stop accepting, let in-flight associations finish (up to ``shutdown_grace_s``), then abort."""
        server = self._server
        if server is None:
            return
        aborted = server.stop(self.cfg.shutdown_grace_s)
        self._flusher.shutdown(wait=True)
        self._flusher_down = True
        self.spool.stop()
        self.watermark.stop()
        self._server = None
        log.info("DICOM SCP stopped", aborted=aborted)

    # --- ul.server.Services (association threads) ------------------------------------------------
    def may_connect(self, host: str) -> bool:
        if address_allowed(self.cfg, host):
            return True
        log.info("connection closed: address not in the allowlist", peer=host)
        return False

    def admit(self, calling_ae: str, host: str) -> bool:
        if caller_allowed(self.cfg, calling_ae, host):
            return True
        log.warning("association rejected: caller not allowed", calling_ae=calling_ae, peer=host)
        return False

    def closed(self, assoc: Association, aborted: bool) -> None:
        with self._lock:
            studies = self._assoc_studies.pop(id(assoc), set())
        try:
            records.release_association(self.store, studies)
        except Exception:
            log.exception("could not release association's studies", studies=sorted(studies))
        if self.assembler is not None and studies:
            self.assembler.poke()

    def _studies_of(self, assoc: Association) -> set[int]:
        with self._lock:
            return self._assoc_studies.setdefault(id(assoc), set())

    def _stored(self, rec: records.Recorded, header: InstanceHeader, size: int, rel: str, sha256: str) -> None:
        """An instance is durable and recorded (before the Success); the ``on_instance`` hooks hear
        of each new one here (they must only enqueue: the ack waits)."""
        if rec.uid_reused:
            log.warning(
                "SOP Instance UID received again with different bytes in another series of the study; both images"
                " kept and analysed"
                if rec.other_series
                else "SOP Instance UID received again with different bytes; both kept",
                sop_uid=header.sop_instance_uid,
                study_uid=header.study_uid,
                instance_id=rec.instance_id,
            )
        if rec.new_revision and rec.new_revision > 1:
            log.info(
                "study re-opened by late instance",
                study_id=rec.study_id,
                study_uid=header.study_uid,
                revision=rec.new_revision,
            )
        log.debug("instance stored", sop_uid=header.sop_instance_uid, study_id=rec.study_id, bytes=size)
        if self.on_instance and not rec.duplicate:
            self._notify(StoredInstance(rec.study_id, self.spool.abspath(rel), sha256, header))

    def begin_instance(
        self, assoc: Association, command: Command, transfer_syntax: str, prefix: bytes
    ) -> StreamedInstance:
        """A C-STORE's data set starts arriving (``ul.server``): file it while it streams in."""
        return StreamedInstance(self, assoc, command, transfer_syntax, prefix)

    def _notify(self, inst: StoredInstance) -> None:
        for hook in self.on_instance:
            try:
                hook(inst)
            except Exception:  # a hook's failure must not turn a durable instance into a failure status
                log.exception("instance hook failed", sop_uid=inst.header.sop_instance_uid)

    def _flush_and_record(
        self,
        fd: int,
        path: Path,
        record: Callable[[Callable[[int], None]], records.Recorded],
        flushed: Future[Any] | None = None,
    ) -> records.Recorded:
        """fsync of the written spool file ``fd`` (on a flusher thread, or ``flushed``: a future that
        fsyncs it, already running) while ``record`` commits the row; returns when both are durable
        (its directory entry already is: ``Spool.take``). On a failed fsync the committed row is
        removed, and the error raised (nothing is acked)."""
        token = self.watermark.begin()
        if flushed is None:
            flushed = self._flusher.submit(os.fsync, fd)
        try:
            rec = record(lambda row_id: self.watermark.assign(token, row_id))
        except BaseException:
            self.watermark.abandon(token)  # a row it may have committed stays above the watermark
            raise
        finally:
            failed = flushed.exception()
        if failed is not None:
            if not rec.duplicate:  # committed, but its file is not durable: never acknowledged
                records.forget_instance(self.store, rec.instance_id)
                path.unlink(missing_ok=True)
            self.watermark.done(token)
            raise failed
        self.watermark.done(token)
        return rec


def _libc_sync_file_range() -> Callable[[int, int, int], None]:
    """``sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)``: start writing the pages to the disk
    now, without waiting, so the final fsync finds most of them written. Linux only; else a no-op."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return lambda fd, offset, n: None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]

    def start(fd: int, offset: int, n: int) -> None:
        fn(fd, offset, n, 2)  # a failure here only loses the head start; fsync still decides

    return start


start_writeback = _libc_sync_file_range()
_ABORT = object()  # stream worker: the data set will not be completed


class StreamedInstance:
    """One C-STORE whose data set is still arriving (``ul.server``'s instance sink).

    The association's thread writes each fragment into a spool file from the reserve as soon as it
    has read it (``feed``); a worker (the SCP's pool) hashes the same fragments meanwhile (sha256
    releases the GIL) and reads the header once the bytes up to Pixel Data are in
    (``parse_header_prefix``). At the last fragment (``finish``) the worker fsyncs the file while the
    association's thread checks the tail, looks for a duplicate and commits the row: the two flushes
    overlap. Nothing is acknowledged before file and row are durable; an instance that never
    completes (``discard``) or is refused leaves no file. When the header cannot be decided from a
    prefix (no Pixel Data, deflate, looks malformed) the whole file is read back and parsed at the
    end (``parse_header``): the same statuses either way.
    """

    def __init__(self, scp: StorageSCP, assoc: Association, command: Command, transfer_syntax: str, prefix: bytes):
        self.scp, self.assoc, self.command, self.transfer_syntax = scp, assoc, command, transfer_syntax
        self.size = 0  # bytes fed, Part-10 prefix included (association's thread)
        self.prefix_size = len(prefix)
        self.file: SpoolFile | None = None
        self.error: OSError | None = None  # a write failed: the rest is drained, then refused
        self.keep = False  # a row may refer to the file: never remove it here
        self.refusal: tuple[int, str] | None = None
        # the worker's side
        self.sha256 = hashlib.sha256()
        self.hashed = 0
        self.head = b""  # the first bytes, until the header is decided
        self.early: EarlyHeader | None = None
        self.undecided = False  # only the whole data set can decide: parsed at the end
        self.settled = threading.Event()  # every fragment hashed, header tried
        self.worker: Future[bool] | None = None  # done once the file is fsynced (or abandoned)
        free = scp.spool.free_bytes()
        if free < scp.cfg.min_free_bytes:  # refused before anything is stored; the data set is drained
            log.error(
                "refusing instance: disk below floor",
                sop_uid=command.sop_instance_uid,
                free_bytes=free,
                min_free_bytes=scp.cfg.min_free_bytes,
            )
            self.refusal = (STATUS_OUT_OF_RESOURCES, "disk space below the configured floor")
            return
        try:
            self.file = scp.spool.take()
        except OSError as exc:  # answered at the end, once the data set is drained
            self.error = exc
            return
        self.queue: SimpleQueue[object] = SimpleQueue()
        self.worker = scp._flusher.submit(self._run)
        self.feed(prefix)

    # --- the association's thread ----------------------------------------------------------------
    def feed(self, chunk: bytes) -> None:
        if self.worker is None or self.file is None:
            return
        self.queue.put(chunk)  # hashed on the worker while this thread writes it
        if self.error is None:
            try:
                write_all(self.file.fd, chunk)
                start_writeback(self.file.fd, self.size, len(chunk))
            except OSError as exc:
                self.error = exc
        self.size += len(chunk)

    def discard(self) -> None:
        """The data set will not complete (abort, dropped connection, oversize): remove what was written."""
        if self.worker is not None:
            self.queue.put(_ABORT)
        self._close()

    def finish(self) -> tuple[int, str | None]:
        """The last fragment is in: complete the filing; the C-STORE status and comment."""
        if self.refusal is not None:
            return self.refusal
        sop_uid = self.command.sop_instance_uid
        try:
            if self.worker is None:
                raise self.error or OSError("no spool file")
            self.queue.put(None)  # after the last write: the worker fsyncs once all is hashed
            self.settled.wait()
            if self.error is not None:
                raise self.error
            return self._complete()
        except Exception as exc:
            return _not_stored(exc, sop_uid)
        finally:
            self._close()

    def _complete(self) -> tuple[int, str | None]:
        scp, f = self.scp, self.file
        assert f is not None and self.worker is not None
        try:
            header = self._checked_header(f.fd)
        except MalformedInstance as bad:
            log.warning(
                "instance refused: malformed",
                status=f"0x{bad.status:04X}",
                reason=bad.reason,
                sop_uid=self.command.sop_instance_uid,
                calling_ae=self.assoc.calling_ae,
            )
            return bad.status, bad.comment
        sha256 = self.sha256.hexdigest()
        existing = records.find_instance(scp.store.conn, header.sop_instance_uid, sha256)
        if existing is not None:
            if not scp.spool.abspath(existing["path"]).exists():  # its file was lost: this copy replaces it
                self._move_to(existing["path"])
            log.info("duplicate acknowledged, not re-stored", sop_uid=header.sop_instance_uid,
                     study_id=existing["study_id"])  # fmt: skip
            return STATUS_SUCCESS, None
        studies = scp._studies_of(self.assoc)

        def record(on_row: Callable[[int], None]) -> records.Recorded:
            return records.record_instance(
                scp.store,
                header,
                rel_path=f.rel,
                size=self.size,
                sha256=sha256,
                transfer_syntax=self.transfer_syntax,
                calling_ae=self.assoc.calling_ae,
                assoc_studies=studies,
                on_row=on_row,
            )

        self.keep = True  # from here a committed row may name the file (a failed flush removes both)
        rec = scp._flush_and_record(f.fd, f.path, record, flushed=self.worker)
        if rec.duplicate:  # a twin on another association committed first: its file is the one kept
            self.keep = False
            log.info("duplicate acknowledged, not re-stored", sop_uid=header.sop_instance_uid, study_id=rec.study_id)
            return STATUS_SUCCESS, None
        scp._stored(rec, header, self.size, f.rel, sha256)
        return STATUS_SUCCESS, None

    def _checked_header(self, fd: int) -> InstanceHeader:
        """The header, checked as ``parse_header`` would: the early one plus its tail, or (undecided)
        the whole file read back and parsed."""
        early, ts, cmd = self.early, self.transfer_syntax, self.command
        if early is None:
            return parse_header(read_all(fd, self.size), cmd.sop_class_uid, cmd.sop_instance_uid, ts)
        if not tail_is_exact(early, self.size, ts):
            check_tail(os.pread(fd, self.size - early.pixel_offset, early.pixel_offset), ts)
        return early.header

    def _move_to(self, rel: str) -> None:
        """Give this (identical) copy the recorded name of a row whose file is missing, durably."""
        assert self.file is not None and self.worker is not None
        self.worker.result()  # the file's fsync
        target = self.scp.spool.abspath(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        replace_durably(self.file.path, target)
        self.keep = True

    def _close(self) -> None:
        if self.worker is not None:  # it may still hash, or fsync the file
            try:
                self.worker.result(timeout=30)
            except Exception as exc:  # an fsync failure was already answered; anything else is a bug
                if not isinstance(exc, OSError):
                    log.exception("stream worker failed", sop_uid=self.command.sop_instance_uid)
        f, self.file = self.file, None
        if f is not None:
            os.close(f.fd)
            if not self.keep:
                f.path.unlink(missing_ok=True)

    # --- the worker ----------------------------------------------------------------------------
    def _run(self) -> bool:
        """Hash the fragments until the end (True) or an abort (False); at the end, fsync the file at
        once (this thread is awake; every write came before the end marker) while the association's
        thread, told by ``settled``, commits the row."""
        try:
            end = self._hash_fragments()
        finally:
            self.settled.set()
        if end and self.error is None and self.file is not None:
            os.fsync(self.file.fd)  # a failure fails this future: the instance is not acknowledged
        return end

    def _hash_fragments(self) -> bool:
        next_try = self.prefix_size + 1  # the first try needs some of the data set, not only our file meta
        while True:
            item = self.queue.get()
            if item is None:
                return True
            if item is _ABORT:
                return False
            assert isinstance(item, bytes)
            self.sha256.update(item)
            self.hashed += len(item)
            if self.early is None and not self.undecided:
                self.head += item
                if self.hashed >= next_try:
                    next_try = 2 * self.hashed  # a header that is not in yet costs at most twice its parse
                    self._try_header()

    def _try_header(self) -> None:
        cmd = self.command
        try:
            self.early = parse_header_prefix(self.head, cmd.sop_class_uid, cmd.sop_instance_uid, self.transfer_syntax)
        except NotStreamable:
            self.undecided = True
        if self.early is not None or self.undecided:
            self.head = b""
