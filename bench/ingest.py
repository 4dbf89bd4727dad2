"""C-STORE receive throughput: the appliance (fsync on) vs dcmtk storescp and Orthanc, same files, same run.

    PYTHONPATH=. python bench/ingest.py [--instances 500] [--reps 3]

Sends a 500-instance 512x512 16-bit series over loopback with dcmtk storescu (TCP_NODELAY=1) into a
fresh receiver per repetition, and prints median instances/s, MB/s and the ratios appliance/storescp
and appliance/Orthanc (of the medians, and per repetition: each pair ran back to back). storescp does
not fsync; Orthanc >= 1.7.4 fsyncs each stored file (``SyncStorageArea``, its default, kept here); the
appliance fsyncs every file and its SQLite commit before each acknowledgement (the file's directory entry
was made durable beforehand, by the spool's reserve). The receivers are ``testsupport``'s launchers.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testsupport.daemon import start_daemon  # noqa: E402
from testsupport.dcmtk import storescp, storescu, storescu_results  # noqa: E402
from testsupport.dicom import write_series  # noqa: E402
from testsupport.orthanc import AET, Orthanc, have_orthanc  # noqa: E402


def send(port: int, files: list[Path], called: str) -> float:
    """Seconds for one dcmtk storescu run of ``files``; RuntimeError unless every file was acknowledged."""
    t0 = time.perf_counter()
    r = storescu(port, files, called=called, timeout=3600)
    elapsed = time.perf_counter() - t0
    ok = sum(1 for v in storescu_results(r.stdout).values() if v == "Success")
    if ok != len(files):
        raise RuntimeError(f"{called}: only {ok}/{len(files)} acknowledged:\n{r.stdout[-2000:]}")
    return elapsed


def run_appliance(work: Path, files: list[Path]) -> float:
    home = work / "appliance"
    d = start_daemon(home, env={"APPLIANCE_LOG__LEVEL": "WARNING"})
    try:
        return send(d.port, files, d.ae_title)
    finally:
        d.stop()


def run_storescp(work: Path, files: list[Path]) -> float:
    with storescp(work / "storescp") as port:
        return send(port, files, "STORESCP")


def run_orthanc(work: Path, files: list[Path]) -> float:
    # Orthanc's own default (and this bench's figures so far): it fsyncs each stored file
    with Orthanc(work / "orthanc", config={"SyncStorageArea": True}) as pacs:
        return send(pacs.dicom_port, files, AET)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=500)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", choices=["appliance", "storescp", "orthanc"], action="append")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        tmpdir = Path(tmp)
        files = write_series(tmpdir / "series", args.instances, rows=512, cols=512)
        total_mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"{len(files)} instances, 512x512 16-bit, {total_mb:.1f} MB total; {args.reps} repetitions each")
        targets: dict[str, Callable[[Path, list[Path]], float]] = {
            "appliance": run_appliance,
            "storescp": run_storescp,
            "orthanc": run_orthanc,
        }
        if args.only:
            targets = {k: v for k, v in targets.items() if k in args.only}
        if "orthanc" in targets and not have_orthanc():
            print("Orthanc not installed: skipped")
            targets.pop("orthanc")
        times: dict[str, list[float]] = {k: [] for k in targets}
        for rep in range(args.reps):
            for name, fn in targets.items():  # interleaved, so drift hits every receiver alike
                work = tmpdir / f"{name}-{rep}"
                work.mkdir()
                times[name].append(fn(work, files))
                shutil.rmtree(work, ignore_errors=True)
        rates = {}
        for name, ts in times.items():
            med = statistics.median(ts)
            rates[name] = len(files) / med
            runs = ", ".join(f"{len(files) / t:.0f}" for t in ts)
            print(f"{name:10s} median {rates[name]:7.1f} inst/s  {total_mb / med:7.1f} MB/s   (runs inst/s: {runs})")
        if "appliance" in rates:
            for other in ("storescp", "orthanc"):
                if other in rates:
                    # each repetition's pair ran back to back: their ratios drift less than the medians
                    pairs = [o / a for a, o in zip(times["appliance"], times[other], strict=True)]
                    each = ", ".join(f"{r:.2f}" for r in pairs)
                    print(
                        f"appliance/{other}: {rates['appliance'] / rates[other]:.2f}x"
                        f"  (per repetition: {each}; median {statistics.median(pairs):.2f}x)"
                    )


if __name__ == "__main__":
    main()
