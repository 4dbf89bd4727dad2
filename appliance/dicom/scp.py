"""The C-ECHO / C-STORE SCP: the box's front door for modalities.

Hot path of one C-STORE (in the association's thread): disk guard -> raw bytes (file meta + the data
set exactly as received, never decoded into pixels or re-encoded) -> header check (see ``header``) ->
spool file created and written (``spool``) -> its fsync and its directory's fsync on the flusher
threads *while* the SQLite transaction (``records``, synchronous=FULL) commits -> 0x0000 once all three
are durable. Any failure answers a failure status, so nothing is acknowledged that is not on disk;
a row whose file never became durable is removed (now, or at startup: ``durability``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.config import DicomConfig
from appliance.dicom import records
from appliance.dicom.assembler import StudyAssembler
from appliance.dicom.contexts import scp_contexts
from appliance.dicom.durability import Watermark, verify_after, write_watermark
from appliance.dicom.header import InstanceHeader, MalformedInstance, parse_header
from appliance.dicom.spool import Spool, fsync_dir
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
        """Per in-flight instance: its header parse (beside the handler's sha256), then its two flushes
        (file, directory, beside the handler's commit)."""
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
            rel = self.spool.relpath(header.study_uid, header.sop_instance_uid, sha256)
            assoc_studies = self._studies_of(assoc)

            def record(on_row: Callable[[int], None]) -> records.Recorded:
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

            rec = self._file_and_record(rel, data, record)
        except OSError as exc:
            log.error("instance not stored: write failed", sop_uid=sop_uid, error=str(exc))
            return STATUS_WRITE_FAILED, "could not write or record the instance"
        except Exception:
            log.exception("instance not stored: internal error", sop_uid=sop_uid)
            return STATUS_PROCESSING_FAILURE, "internal error"
        if rec.uid_reused:
            log.warning(
                "SOP Instance UID received again with different bytes; both kept",
                sop_uid=sop_uid,
                study_uid=header.study_uid,
                instance_id=rec.instance_id,
            )
        if rec.new_revision and rec.new_revision > 1:
            log.info("study re-opened by late instance", study_uid=header.study_uid, revision=rec.new_revision)
        log.debug("instance stored", sop_uid=sop_uid, study_id=rec.study_id, bytes=len(data))
        if self.on_instance and not rec.duplicate:
            self._notify(StoredInstance(rec.study_id, self.spool.abspath(rel), sha256, header))
        return STATUS_SUCCESS, None

    def _notify(self, inst: StoredInstance) -> None:
        for hook in self.on_instance:
            try:
                hook(inst)
            except Exception:  # a hook's failure must not turn a durable instance into a failure status
                log.exception("instance hook failed", sop_uid=inst.header.sop_instance_uid)

    def _file_and_record(
        self, rel: str, data: bytes | bytearray, record: Callable[[Callable[[int], None]], records.Recorded]
    ) -> records.Recorded:
        """Write the spool file and commit its row with the three flushes overlapped; returns only
        when file, directory entry and row are all durable (else raises, and nothing is acked)."""
        token = self.watermark.begin()
        mark = lambda row_id: self.watermark.assign(token, row_id)  # noqa: E731
        try:
            fd, path = self.spool.create(rel, data)
        except FileExistsError:  # rare: leftover of an unacked attempt, or a concurrent twin
            try:
                self.spool.write_durable(rel, data)  # file durable before the row: no overlap
                return record(mark)
            finally:
                self.watermark.done(token)
        except BaseException:
            self.watermark.abandon(token)
            raise
        try:
            flushes = [self._flusher.submit(os.fsync, fd), self._flusher.submit(fsync_dir, path.parent)]
            try:
                rec = record(mark)
            except BaseException:
                self.watermark.abandon(token)  # a row it may have committed stays above the watermark
                raise
            finally:
                errors = [f.exception() for f in flushes]
        finally:
            os.close(fd)
        failed = next((e for e in errors if e is not None), None)
        if failed is not None:
            if not rec.duplicate:  # committed, but its file is not durable: never acknowledged
                records.forget_instance(self.store, rec.instance_id)
                path.unlink(missing_ok=True)
            self.watermark.done(token)
            raise failed
        self.watermark.done(token)
        return rec
