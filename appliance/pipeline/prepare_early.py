"""Prepare each image while its study is still arriving, so the worker finds the model inputs ready.

The receiver calls :meth:`EarlyPreparer.submit` for every new durable instance (``StorageSCP.on_instance``);
it only enqueues. One or two threads take the queue in arrival order, route each image from its header
(which active bundles take it) and run :func:`~appliance.pipeline.preprocess.prepare` for each, during the
assembler's quiet period, which is otherwise idle on the CPU (each waits until no association is open, at
most ``early_max_defer_s``: decoding beside a transfer slowed it). The results go to a
:class:`PreparedCache` keyed by (sha256 of the received bytes, bundle id, bundle version): other bytes or another
bundle version is another key, so a cached entry can never be served for anything but the exact same input.

The worker looks each image up (waiting, bounded, for one still being prepared) and prepares the misses itself,
exactly as before: ``prepare`` is deterministic, so the results are identical either way. An image whose
preparation fails is not cached; the worker then prepares it again and records the reason as usual. Memory is
bounded by the cache's byte cap (least recently used first out; an entry is the model input plus the display
image the SC is drawn on, at most ``DISPLAY_LONG_SIDE`` pixels on its long side, about 4 MB) and by the queue
size (a full queue skips the image). Images are decoded in full, whatever their transfer syntax: the entry is
the same for every lossless encoding of the same pixels.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pydicom import dcmread

from appliance.core.config import Settings
from appliance.core.logs import get_logger
from appliance.pipeline.preprocess import NotProcessable, Prepared, prepare
from appliance.pipeline.router import image_matches, modality_applies
from engines.manifest import Manifest

if TYPE_CHECKING:
    from appliance.pipeline.worker import BundleSource

log = get_logger(__name__)


class ArrivedInstance(Protocol):
    """An instance the receiver has made durable (``appliance.ingest.scp.StoredInstance`` is one): its spool
    file, the sha256 of its bytes and its Modality as read from the header (None when absent)."""

    @property
    def path(self) -> Path: ...

    @property
    def sha256(self) -> str: ...

    @property
    def modality(self) -> str | None: ...


CacheKey = tuple[str, str, str]  # (sha256 of the instance's bytes, bundle id, bundle version)
MANIFESTS_TTL_S = 2.0  # how long the list of active bundles is reused (a new version is a new key anyway)
RECEIVING_POLL_S = 0.005  # how often a deferred preparation checks whether the receiver is still busy
MISSED_KEPT = 1024  # keys the worker looked up in vain (and so prepared itself): not prepared again


def cache_key(sha256: str, manifest: Manifest) -> CacheKey:
    return (sha256, manifest.bundle_id, manifest.version)


def prepared_bytes(p: Prepared) -> int:
    return int(p.tensor.nbytes + p.display.nbytes)


class PreparedCache:
    """Thread-safe LRU of :class:`Prepared` by bytes, with the keys now being prepared (so nobody waits
    for, or repeats, the same work twice). Cached arrays are made read-only: a shared entry cannot be changed."""

    def __init__(self, max_bytes: int, max_entry_bytes: int | None = None):
        self.max_bytes = int(max_bytes)
        self.max_entry_bytes = int(max_entry_bytes) if max_entry_bytes is not None else max(1, self.max_bytes // 8)
        self._entries: OrderedDict[CacheKey, tuple[Prepared, int]] = OrderedDict()
        self._pending: dict[CacheKey, threading.Event] = {}
        self._missed: OrderedDict[CacheKey, None] = OrderedDict()  # the worker prepared these itself
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: CacheKey) -> bool:
        with self._lock:
            return key in self._entries

    def put(self, key: CacheKey, prep: Prepared) -> bool:
        """Cache one entry (evicting the least recently used); False when it is larger than an entry may be."""
        with self._lock:
            return self._put_locked(key, prep)

    def _put_locked(self, key: CacheKey, prep: Prepared) -> bool:
        size = prepared_bytes(prep)
        if size > self.max_entry_bytes:
            return False
        prep.tensor.flags.writeable = False
        prep.display.flags.writeable = False
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        self._entries[key] = (prep, size)
        self._bytes += size
        while self._bytes > self.max_bytes and self._entries:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._bytes -= evicted
        return key in self._entries

    def claim(self, key: CacheKey) -> bool:
        """True when the caller should prepare ``key`` (not cached, not being prepared, not already looked up
        in vain: then the worker has prepared it itself); it must then call :meth:`finish`, with the result
        or None."""
        with self._lock:
            if key in self._entries or key in self._pending or key in self._missed:
                return False
            self._pending[key] = threading.Event()
            return True

    def finish(self, key: CacheKey, prep: Prepared | None) -> None:
        with self._lock:
            event = self._pending.pop(key, None)
            if prep is not None:
                self._put_locked(key, prep)
        if event is not None:
            event.set()

    def get(self, key: CacheKey, wait_s: float = 0.0) -> Prepared | None:
        """The cached entry; one being prepared is waited for (at most ``wait_s``); else None."""
        with self._lock:
            entry = self._entries.get(key)
            event = self._pending.get(key) if entry is None else None
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[0]
        if event is not None and wait_s > 0 and event.wait(wait_s):
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return entry[0]
        with self._lock:
            self.misses += 1
            self._missed[key] = None
            while len(self._missed) > MISSED_KEPT:
                self._missed.popitem(last=False)
        return None


class EarlyPreparer:
    """Service (``name``, ``start()``, ``stop()``): prepares arriving instances into a :class:`PreparedCache`."""

    name = "prepare-early"

    def __init__(
        self,
        settings: Settings,
        bundles: BundleSource,
        cache: PreparedCache,
        receiving: Callable[[], bool] | None = None,
    ):
        p = settings.pipeline
        self.settings = settings
        self.bundles = bundles
        self.cache = cache
        self.receiving = receiving  # True while an association is open (the SCP's active_associations)
        self.queue: queue.Queue[tuple[float, ArrivedInstance]] = queue.Queue(maxsize=p.early_queue_size)
        self.threads = p.early_prepare_threads
        self.skipped = 0  # arrivals not enqueued: the queue was full
        self.prepared = 0  # entries put in the cache
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._manifests: list[Manifest] = []
        self._manifests_at = float("-inf")
        self._manifests_lock = threading.Lock()

    # -- the receiver's hook (association thread): enqueue only ------------------------------------------
    def submit(self, inst: ArrivedInstance) -> None:
        try:
            self.queue.put_nowait((time.monotonic(), inst))
        except queue.Full:
            self.skipped += 1  # the worker will prepare it

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        for i in range(self.threads):
            t = threading.Thread(target=self._loop, name=f"prepare-early-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)
        self._threads = []

    def status(self) -> dict[str, int]:
        return {"cached": len(self.cache), "cached_bytes": self.cache.nbytes, "skipped": self.skipped}

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                arrived, inst = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            self._wait_until_receiving_stops(arrived)
            try:
                self.prepare_instance(inst)
            except Exception:  # never fatal: the worker prepares what is not cached
                log.exception("early preparation failed", path=str(inst.path))

    def _wait_until_receiving_stops(self, arrived: float) -> None:
        """Decoding beside an association slowed the transfer (2 cores, one GIL: mammogram receive 195 ->
        360 ms): start once no association is open, or ``early_max_defer_s`` after the image arrived."""
        if self.receiving is None:
            return
        until = arrived + self.settings.pipeline.early_max_defer_s
        while not self._stop.is_set() and self.receiving() and time.monotonic() < until:
            self._stop.wait(RECEIVING_POLL_S)

    # -- one instance -------------------------------------------------------------------------------------
    def active_manifests(self) -> list[Manifest]:
        """The active bundles' manifests, re-read at most every ``MANIFESTS_TTL_S``."""
        with self._manifests_lock:
            if time.monotonic() - self._manifests_at > MANIFESTS_TTL_S:
                self._manifests = [m for m, _ in self.bundles.active()]
                self._manifests_at = time.monotonic()
            return self._manifests

    def prepare_instance(self, inst: ArrivedInstance) -> int:
        """Prepare one arrived instance for every active bundle that takes it; returns the entries cached."""
        claimed = [
            (m, key)
            for m in self.active_manifests()
            if modality_applies(m, inst.modality)  # from the receiver's header: no file read
            and self.cache.claim(key := cache_key(inst.sha256, m))
        ]
        if not claimed:
            return 0
        p = self.settings.pipeline
        done = 0
        ds = None
        try:
            ds = dcmread(inst.path)
        except Exception as exc:  # the worker reports unreadable files
            log.debug("early preparation: unreadable", path=str(inst.path), error=str(exc))
        for m, key in claimed:
            prep: Prepared | None = None
            try:
                if ds is not None and image_matches(m, ds):
                    prep = prepare(ds, m.input.preprocessing, p.max_pixels, p.min_image_size)
            except NotProcessable:
                pass  # the worker records the reason
            finally:
                self.cache.finish(key, prep)
            if prep is not None and key in self.cache:
                done += 1
        self.prepared += done
        return done
