"""The flushes behind one C-STORE acknowledgement, in a row vs overlapped (micro-benchmark).

    PYTHONPATH=. python bench/ingest_flush.py [--n 200] [--dir /var/lib/appliance-bench]

Per round: create a 525 kB spool file and write it, then make it durable with its SQLite row
(WAL, synchronous=FULL) in the ways the SCP could: ``sequential`` (the old order: temp file,
fsync, rename, fsync dir, commit), ``overlapped`` (what the SCP does now: file fsync and dir fsync
on two threads while the commit runs), ``fdatasync`` (sequential with fdatasync), and ``no_fsync``
(write only: the floor). Blocks of 25 rounds per variant, cycled. Prints the median and p90 per
variant; run it on the disk that holds the spool.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from durable import fsync_dir

BLOCK = 25


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-flush-", dir=args.dir) as tmp:
        root = Path(tmp)
        study = root / "study"
        study.mkdir()
        data = os.urandom(525_000)
        db = sqlite3.connect(root / "state.db", isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, path TEXT, sha256 TEXT, meta BLOB)")
        pool = ThreadPoolExecutor(2)

        def commit(name: str) -> None:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t(path, sha256, meta) VALUES (?,?,?)", (name, "0" * 64, b"m" * 300))
            db.execute("COMMIT")

        def create(name: str) -> int:
            fd = os.open(study / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            os.write(fd, data)
            return fd

        def sequential(i: int) -> None:
            tmpname = f".tmp-{uuid.uuid4().hex}"
            fd = create(tmpname)
            os.fsync(fd)
            os.close(fd)
            os.replace(study / tmpname, study / f"s{i}.dcm")
            fsync_dir(study)
            commit(f"s{i}")

        def fdatasync(i: int) -> None:
            fd = create(f"d{i}.dcm")
            os.fdatasync(fd)
            os.close(fd)
            fsync_dir(study)
            commit(f"d{i}")

        def overlapped(i: int) -> None:
            fd = create(f"o{i}.dcm")
            futures = [pool.submit(os.fsync, fd), pool.submit(fsync_dir, study)]
            commit(f"o{i}")
            for f in futures:
                f.result()
            os.close(fd)

        def no_fsync(i: int) -> None:
            os.close(create(f"n{i}.dcm"))

        variants: dict[str, Callable[[int], None]] = {
            "sequential": sequential,
            "fdatasync": fdatasync,
            "overlapped": overlapped,
            "no_fsync": no_fsync,
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        # blocks of BLOCK rounds per variant, cycled: drift hits every variant alike, and one variant's
        # unflushed pages are not flushed on the next one's clock (os.sync() between blocks)
        for start in range(0, args.n, BLOCK):
            for name, fn in variants.items():
                os.sync()
                for i in range(start, min(args.n, start + BLOCK)):
                    t0 = time.perf_counter()
                    fn(i)
                    times[name].append(time.perf_counter() - t0)
        with open("/proc/loadavg") as f:
            load = " ".join(f.read().split()[:3])
        print(f"{args.n} rounds of a 525 kB file + its row; load average {load}")
        for name, ts in times.items():
            ts.sort()
            med, p90 = statistics.median(ts) * 1e3, ts[int(0.9 * len(ts))] * 1e3
            print(f"{name:11s} median {med:6.2f} ms   p90 {p90:6.2f} ms")


if __name__ == "__main__":
    main()
