"""The C-ECHO / C-STORE SCP: the box's front door for modalities.

Hot path of one C-STORE: disk guard -> while the fragments arrive, a worker hashes them, reads the
header from the prefix and writes them into a spool file taken from the reserve (``StreamedInstance``;
the data set exactly as received, never decoded or re-encoded; the file's directory entry is already
durable, see ``spool``) -> at the last fragment: tail check -> the file's fsync on a flusher thread
*while* the SQLite transaction (``records``, synchronous=FULL) commits -> 0x0000 once both are
durable. An instance whose header cannot be decided early is filed from one buffer at the end
(``store_instance``), same order. Any failure answers a failure status, so nothing is acknowledged
that is not on disk; a row whose file never became durable is removed (now, or at startup:
``durability``)."""

from __future__ import annotations

import contextlib
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

from appliance.config import DicomConfig
from appliance.dicom import records
from appliance.dicom.assembler import StudyAssembler
from appliance.dicom.contexts import scp_contexts
from appliance.dicom.durability import Watermark, verify_after, write_watermark
from appliance.dicom.header import (
    EarlyHeader,
    InstanceHeader,
    MalformedInstance,
    NotStreamable,
    check_tail,
    parse_header,
    parse_header_prefix,
    tail_is_exact,
)
from appliance.dicom.spool import Spool, fsync_dir, write_all
from appliance.dicom.ul.dimse import Command
from appliance.dicom.ul.server import Association, AssociationServer, ServerConfig
from appliance.logs import get_logger
from appliance.store import Store

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
        if self._flusher._shutdown:  # restarted after stop()
            self._flusher = self._make_flusher()
        cfg = self.cfg
        server_cfg = ServerConfig(
            max_associations=cfg.max_associations,
            max_pdu=cfg.max_pdu,
            acse_timeout=cfg.acse_timeout,
            dimse_timeout=cfg.dimse_timeout,
            network_timeout=cfg.network_timeout,
            max_instance_bytes=cfg.max_instance_bytes,
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

    def active_associations(self) -> int:
        return self._server.count() if self._server is not None else 0

    def status(self) -> dict[str, Any]:
        host, port = self.address
        return {"ae_title": self.cfg.ae_title, "host": host, "port": port}

    def stop(self) -> None:
        """Stop accepting, let in-flight associations finish (up to ``shutdown_grace_s``), then abort."""
        server = self._server
        if server is None:
            return
        aborted = server.stop(self.cfg.shutdown_grace_s)
        self._flusher.shutdown(wait=True)
        self.spool.stop()
        self.watermark.stop()
        self._server = None
        log.info("DICOM SCP stopped", aborted=aborted)

    # --- ul.server.Services (association threads) ------------------------------------------------
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

    def store_instance(
        self, assoc: Association, command: Command, transfer_syntax: str, data: bytearray
    ) -> tuple[int, str | None]:
        """File one instance (``data``: Part-10 bytes, the data set exactly as received); returns the
        C-STORE status and, for a failure, an error comment."""
        calling = assoc.calling_ae
        sop_uid = command.sop_instance_uid
        try:
            free = self.spool.free_bytes()
            if free < self.cfg.min_free_bytes:
                log.error(
                    "refusing instance: disk below floor",
                    sop_uid=sop_uid,
                    free_bytes=free,
                    min_free_bytes=self.cfg.min_free_bytes,
                )
                return STATUS_OUT_OF_RESOURCES, "disk space below the configured floor"
            # The header parse (Python, holds the GIL) runs on a worker while this thread hashes (C,
            # releases the GIL): the two overlap instead of adding up.
            parsed = self._flusher.submit(parse_header, data, command.sop_class_uid, sop_uid, transfer_syntax)
            sha256 = hashlib.sha256(data).hexdigest()
            try:
                header = parsed.result()
            except MalformedInstance as bad:
                log.warning(
                    "instance refused: malformed",
                    status=f"0x{bad.status:04X}",
                    reason=bad.reason,
                    sop_uid=sop_uid,
                    calling_ae=calling,
                )
                return bad.status, bad.comment
            existing = records.find_instance(self.store.conn, header.sop_instance_uid, sha256)
            if existing is not None and self.spool.abspath(existing["path"]).exists():
                log.info("duplicate acknowledged, not re-stored", sop_uid=sop_uid, study_id=existing["study_id"])
                return STATUS_SUCCESS, None
            assoc_studies = self._studies_of(assoc)

            def record(rel: str, on_row: Callable[[int], None]) -> records.Recorded:
                return records.record_instance(
                    self.store,
                    header,
                    rel_path=rel,
                    size=len(data),
                    sha256=sha256,
                    transfer_syntax=transfer_syntax,
                    calling_ae=calling,
                    assoc_studies=assoc_studies,
                    on_row=on_row,
                )

            rec, rel = self._file_and_record(data, record)
        except Exception as exc:
            return _not_stored(exc, sop_uid)
        self._stored(rec, header, len(data), rel, sha256)
        return STATUS_SUCCESS, None

    def _stored(self, rec: records.Recorded, header: InstanceHeader, size: int, rel: str, sha256: str) -> None:
        """An instance is durable and recorded (both store paths end here, before the Success); the
        ``on_instance`` hooks hear of each new one here (they must only enqueue: the ack waits)."""
        if rec.uid_reused:
            log.warning(
                "SOP Instance UID received again with different bytes; both kept",
                sop_uid=header.sop_instance_uid,
                study_uid=header.study_uid,
                instance_id=rec.instance_id,
            )
        if rec.new_revision and rec.new_revision > 1:
            log.info("study re-opened by late instance", study_uid=header.study_uid, revision=rec.new_revision)
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

    def _file_and_record(
        self, data: bytes | bytearray, record: Callable[[str, Callable[[int], None]], records.Recorded]
    ) -> tuple[records.Recorded, str]:
        """Write ``data`` into a reserved spool file and commit its row (``record(rel, on_row)``) with
        the flushes overlapped; returns the row and the file's name only when both are durable (else
        raises, the file is removed and nothing is acked)."""
        f = self.spool.take()
        try:
            write_all(f.fd, data)
            rec = self._flush_and_record(f.fd, f.path, lambda on_row: record(f.rel, on_row))
        except BaseException:
            self.spool.discard(f)  # a committed row for it was already removed by _flush_and_record
            raise
        os.close(f.fd)
        if rec.duplicate:  # a twin on another association committed first: its file is the one kept
            f.path.unlink(missing_ok=True)
        return rec, f.rel

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

    A worker (the SCP's pool) takes the fragments as the association's thread reads them: it hashes
    each (sha256 releases the GIL), tries the header as soon as the bytes up to Pixel Data are in
    (``parse_header_prefix``), then creates the spool file under the study's directory and writes
    every fragment into it. At the last fragment (``finish``) only the rest of the writes, the tail
    check and the three overlapped flushes remain. Nothing is acknowledged before file, directory
    entry and row are durable; an instance that never completes (``discard``) leaves no file. When
    the header cannot be decided early (no Pixel Data, deflate, looks malformed) the fragments are
    kept and the whole instance is filed at the end by ``StorageSCP.store_instance`` as before.
    """

    def __init__(self, scp: StorageSCP, assoc: Association, command: Command, transfer_syntax: str, prefix: bytes):
        self.scp, self.assoc, self.command, self.transfer_syntax = scp, assoc, command, transfer_syntax
        self.parts: list[bytes] = [prefix]  # not yet in the spool file
        self.size = len(prefix)
        self.sha256 = hashlib.sha256(prefix)
        self.early: EarlyHeader | None = None
        self.fd: int | None = None
        self.rel = ""
        self.path: Path | None = None
        self.error: OSError | None = None
        self.written = 0
        self.given_up = False
        self.keep = False  # a row may refer to the file: never remove it here
        self.refusal: tuple[int, str] | None = None
        self.worker: Future[bool] | None = None  # done once the file is fsynced (or the data set abandoned)
        self.settled = threading.Event()  # every fragment hashed and written (or an error noted)
        free = scp.spool.free_bytes()
        if free < scp.cfg.min_free_bytes:  # refused before anything is stored; the data set is drained
            log.error(
                "refusing instance: disk below floor",
                sop_uid=command.sop_instance_uid,
                free_bytes=free,
                min_free_bytes=scp.cfg.min_free_bytes,
            )
            self.refusal = (STATUS_OUT_OF_RESOURCES, "disk space below the configured floor")
            self.parts = []
            return
        self.queue: SimpleQueue[object] = SimpleQueue()
        self.worker = scp._flusher.submit(self._run)

    # --- the association's thread ----------------------------------------------------------------
    def feed(self, chunk: bytes) -> None:
        if self.worker is not None:
            self.queue.put(chunk)

    def discard(self) -> None:
        """The data set will not complete (abort, dropped connection, oversize): remove what was written."""
        if self.worker is not None:
            self.queue.put(_ABORT)
            try:
                self.worker.result(timeout=30)
            except Exception:
                log.exception("stream worker failed", sop_uid=self.command.sop_instance_uid)
        self._close()

    def finish(self) -> tuple[int, str | None]:
        """The last fragment is in: complete the filing; the C-STORE status and comment."""
        if self.refusal is not None or self.worker is None:
            return self.refusal or (STATUS_PROCESSING_FAILURE, "internal error")
        self.queue.put(None)
        sop_uid = self.command.sop_instance_uid
        try:
            self.settled.wait()
            if self.worker.done() and self.worker.exception() is not None:
                raise self.worker.exception()  # type: ignore[misc]
            if self.error is not None:
                raise self.error
            if self.fd is None:  # header not decided early: file the whole instance from one buffer
                data = bytearray(b"".join(self.parts))
                self.parts = []
                return self.scp.store_instance(self.assoc, self.command, self.transfer_syntax, data)
            return self._complete()
        except Exception as exc:
            return _not_stored(exc, sop_uid)
        finally:
            self._close()

    def _complete(self) -> tuple[int, str | None]:
        scp, early, fd, path = self.scp, self.early, self.fd, self.path
        assert early is not None and fd is not None and path is not None
        header = early.header
        try:
            if not tail_is_exact(early, self.size, self.transfer_syntax):
                check_tail(os.pread(fd, self.size - early.pixel_offset, early.pixel_offset), self.transfer_syntax)
        except MalformedInstance as bad:
            log.warning(
                "instance refused: malformed",
                status=f"0x{bad.status:04X}",
                reason=bad.reason,
                sop_uid=header.sop_instance_uid,
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
                rel_path=self.rel,
                size=self.size,
                sha256=sha256,
                transfer_syntax=self.transfer_syntax,
                calling_ae=self.assoc.calling_ae,
                assoc_studies=studies,
                on_row=on_row,
            )

        self.keep = True  # from here a committed row may name the file (a failed flush removes both)
        rec = scp._flush_and_record(fd, path, record, flushed=self.worker)
        if rec.duplicate:  # a twin on another association committed first: its file is the one kept
            self.keep = False
            log.info("duplicate acknowledged, not re-stored", sop_uid=header.sop_instance_uid, study_id=rec.study_id)
            return STATUS_SUCCESS, None
        scp._stored(rec, header, self.size, self.rel, sha256)
        return STATUS_SUCCESS, None

    def _move_to(self, rel: str) -> None:
        """Give this (identical) copy the recorded name of a row whose file is missing, durably."""
        assert self.fd is not None and self.path is not None
        target = self.scp.spool.abspath(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.fsync(self.fd)
        os.replace(self.path, target)
        fsync_dir(target.parent)
        self.keep = True

    def _close(self) -> None:
        if self.worker is not None:  # its fsync may still run on the fd
            with contextlib.suppress(Exception):
                self.worker.result(timeout=30)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            if not self.keep and self.path is not None:
                self.path.unlink(missing_ok=True)
        self.parts = []

    # --- the worker ----------------------------------------------------------------------------
    def _run(self) -> bool:
        """Take fragments until the end (True) or an abort (False). At the end the file is fsynced
        here at once (this thread is awake and wrote the last bytes) while the handler, told by
        ``settled``, checks the tail and commits the row: the two flushes overlap."""
        try:
            end = self._take_fragments()
        finally:
            self.settled.set()
        if end and self.fd is not None and self.error is None:
            os.fsync(self.fd)  # an error here fails the future: the instance is not acknowledged
        return end

    def _take_fragments(self) -> bool:
        next_try = 0
        while True:
            item = self.queue.get()
            if item is None:
                return True
            if item is _ABORT:
                return False
            assert isinstance(item, bytes)
            self.sha256.update(item)
            self.size += len(item)
            if self.error is not None:
                continue
            if self.fd is not None:
                self._write(item)
                continue
            self.parts.append(item)
            if not self.given_up and self.size >= next_try:
                next_try = 2 * self.size  # a header that is not in yet costs at most twice its parse
                self._try_open()

    def _try_open(self) -> None:
        data = b"".join(self.parts)
        try:
            early = parse_header_prefix(
                data, self.command.sop_class_uid, self.command.sop_instance_uid, self.transfer_syntax
            )
        except NotStreamable:
            self.given_up = True
            return
        if early is None:
            return
        try:
            f = self.scp.spool.take()
            self.fd, self.rel, self.path = f.fd, f.rel, f.path
        except OSError as exc:
            self.error = exc
            self.parts = []
            return
        self.early = early
        self.parts = []
        self._write(data)

    def _write(self, data: bytes) -> None:
        assert self.fd is not None
        try:
            write_all(self.fd, data)
            start_writeback(self.fd, self.written, len(data))
            self.written += len(data)
        except OSError as exc:
            self.error = exc
