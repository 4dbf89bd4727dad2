"""Throughput and peak memory of ``appliance central ingest`` for growing inputs (issue 17: memory must stay flat).

    PYTHONPATH=. python bench/central_ingest.py [--records 100000 1000000] [--devices 50] [--days 7] [--workdir DIR]

For each size N, the input is generated once (kept in ``--workdir`` when given, reused when already there):
N messages sealed by the product's own envelope code (``appliance.cloud.crypto.encrypt`` of a compact sorted JSON
``result/v1`` body with the issue-17 fields, one ``stats/v1`` per device and day, ~1% ``feedback/v1``), 1% of them
delivered twice (at-least-once), from ``--devices`` boxes over ``--days`` days and two bundles, routed by the fake
hub's storage endpoint (Avro, IoT Hub's record schema, 10 MB chunks) into a folder. Generation uses every CPU.

Then ``python -m appliance central ingest --from DIR --to STORE`` runs as a subprocess on a fresh store; the
figures are its wall time, events/s, and the peak resident set of that process (``ru_maxrss`` from ``wait4``).
Prints one JSON line per size and a Markdown table for docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

T0 = 1_772_323_200.0  # 2026-03-01T00:00:00Z


def _gen_chunk(args: tuple[int, int, int, int, int, str, str]) -> int:
    """Worker: messages [lo, hi) of n, written as routed Avro files under out/w<worker>/."""
    from testsupport.central import feedback_plaintext, result_plaintext, routed, seal, stats_plaintext
    from testsupport.fakehub.routing import StorageEndpoint, folder_sink

    worker, lo, hi, n, devices, out, pub = args
    days = int(os.environ.get("BENCH_DAYS", "7"))
    span = days * 86400
    ep = StorageEndpoint(folder_sink(Path(out)), iothub=f"bench{worker}", max_chunk_bytes=10_485_760)
    count = 0
    for i in range(lo, hi):
        device = f"box-{i % devices:03d}"
        when = T0 + span * i / n
        bundle = ("ref-cxr", "1.0.0") if i % 3 else ("ref-cxr", "1.1.0")
        if i % 100 == 1:
            body = feedback_plaintext(f"mid-{i - 1}")
            kind, schema = "feedback", "feedback/v1"
        elif i % 500 == 2:
            day = time.strftime("%Y-%m-%d", time.gmtime(when))
            body = stats_plaintext(day, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)))
            kind, schema = "stats", "stats/v1"
        else:
            body = result_plaintext(i, bundle)
            kind, schema = "result", "result/v1"
        mid = f"{kind}-{i:08d}"
        rec = routed(device, kind, mid, seal(kind, schema, mid, device, body, pub), when)
        ep.route(rec)
        count += 1
        if i % 100 == 50:  # at-least-once: this one is delivered twice
            ep.route(rec)
            count += 1
    ep.close()
    return count


def generate(n: int, out: Path, devices: int, pub: str) -> int:
    """Write the input for ``n`` messages into ``out``; the number of routed events (with the duplicates)."""
    workers = os.cpu_count() or 1
    step = (n + workers - 1) // workers
    jobs = [(w, w * step, min(n, (w + 1) * step), n, devices, str(out), pub) for w in range(workers)]
    with multiprocessing.Pool(workers) as pool:
        return sum(pool.map(_gen_chunk, jobs))


def run_ingest(src: Path, store: Path, keydir: Path, sites: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APPLIANCE_", "IOTHUB_"))}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [
        sys.executable,
        "-m",
        "appliance",
        "central",
        "ingest",
        "--from",
        str(src),
        "--to",
        str(store),
        "--key",
        str(keydir),
        "--sites",
        str(sites),
    ]
    t = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, errors = out.read().decode(), err.read().decode()
    if proc.returncode not in (0, 1):
        raise SystemExit(f"ingest failed ({proc.returncode}): {errors[-2000:]}")
    summary = json.loads(text.splitlines()[0])
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--workdir", type=Path, default=None, help="keep generated inputs here (reused when present)")
    args = ap.parse_args()
    os.environ["BENCH_DAYS"] = str(args.days)
    from appliance.cloud import crypto

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    work.mkdir(parents=True, exist_ok=True)
    keydir = work / "keys"
    if not (keydir / "central-1.key").exists():
        keydir.mkdir(exist_ok=True)
        priv, pub = crypto.generate_keypair()
        (keydir / "central-1.key").write_text(priv)
        (keydir / "central-1.pub").write_text(pub)
    pub = (keydir / "central-1.pub").read_text().strip()
    sites = work / "sites.csv"
    sites.write_text(
        "device,site,region,health_system,setting\n"
        + "".join(
            f"box-{d:03d},site-{d:03d},region-{d % 5},hs-{d % 2},{'rural' if d % 3 else 'urban'}\n"
            for d in range(args.devices)
        )
    )
    rows = []
    for n in args.records:
        src = work / f"in-{n}"
        marker = src / ".complete"
        if not marker.exists():
            shutil.rmtree(src, ignore_errors=True)
            t = time.perf_counter()
            events = generate(n, src, args.devices, pub)
            marker.write_text(str(events))
            print(f"generated {events} events for {n} messages in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        events = int(marker.read_text())
        size_mb = sum(p.stat().st_size for p in src.rglob("*") if p.is_file()) / 1e6
        store = work / f"store-{n}"
        shutil.rmtree(store, ignore_errors=True)
        r = run_ingest(src, store, keydir, sites)
        s = r["summary"]
        row = {
            "messages": n,
            "events": events,
            "input_mb": round(size_mb, 1),
            "wall_s": round(r["wall_s"], 1),
            "events_per_s": round(events / r["wall_s"]),
            "peak_rss_mb": round(r["peak_rss_mb"], 1),
            "accepted": s["accepted"],
            "duplicates": s["duplicates"],
            "rejected": s["rejected"],
            "files": s["files"],
            "rows": s["rows"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(store, ignore_errors=True)
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "?")
    print(f"\n{platform.node()} | {cpu} x{os.cpu_count()} | Python {platform.python_version()}")
    print("| messages | events (with replays) | input | wall | events/s | peak RSS |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['messages']:,} | {r['events']:,} | {r['input_mb']} MB | {r['wall_s']} s | {r['events_per_s']:,} |"
            f" {r['peak_rss_mb']} MB |"
        )


if __name__ == "__main__":
    main()
