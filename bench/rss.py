"""Daemon memory when idle: resident set size (VmRSS) with the reference models loaded, web dashboard on and off.

Two runs of the real daemon (``python -m appliance run``) on fresh state directories, each with the pipeline on,
the shipped reference bundles (``cxr-phantom``, ``mmg-phantom``) installed and loaded on ONNX Runtime (CPU):

- ``web on``: ``api.enabled = true`` (uvicorn + FastAPI serving HTTPS on an ephemeral port);
- ``web off``: ``api.enabled = false`` (the baseline).

Each run waits until the models are loaded (the pipeline's "pipeline ready" log line), warms the web server up
with a few requests (login page, ``/metrics``, ``/readyz``) when it is on, lets the daemon settle, then reads
``/proc/PID/status`` VmRSS ``--samples`` times one second apart and reports the median. Target (issue 13):
<= 400 MB with the web server up.

Run: PYTHONPATH=. python bench/rss.py [--samples 5] [--settle 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import ssl
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testsupport.common import wait_until  # noqa: E402
from testsupport.daemon import Daemon, running_daemon  # noqa: E402

TARGET_MB = 400.0


def vm_rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB (``/proc/PID/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _warm_web(d: Daemon) -> None:
    ctx = ssl.create_default_context(cafile=str(d.home / "secrets" / "web" / "cert.pem"))
    for path in ("/login", "/metrics", "/readyz", "/healthz", "/api/v1/openapi.json"):
        for _ in range(3):
            with urllib.request.urlopen(d.web_url + path, context=ctx, timeout=30) as r:
                r.read()


def measure(web: bool, samples: int, settle_s: float) -> dict[str, float]:
    """Median VmRSS (MB) of an idle daemon with the reference models loaded; ``web`` turns the dashboard on."""
    env = {
        "APPLIANCE_PIPELINE__ENABLED": "true",
        "APPLIANCE_ENGINES__INSTALL_REFERENCE_BUNDLES": "true",
        "APPLIANCE_ENGINES__BACKEND": "ort",
        "APPLIANCE_API__ENABLED": "true" if web else "false",
    }
    with (
        tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp,
        running_daemon(Path(tmp) / "home", env=env, timeout=300) as d,
    ):
        wait_until(lambda: "pipeline ready" in d.logs(), timeout=600, interval=0.5, what="models loaded")
        if web:
            _warm_web(d)
        time.sleep(settle_s)
        values = []
        for _ in range(samples):
            values.append(vm_rss_kib(d.proc.pid) / 1024)
            time.sleep(1.0)
        return {"median_mb": statistics.median(values), "min_mb": min(values), "max_mb": max(values)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--settle", type=float, default=5.0, help="seconds idle before sampling")
    args = ap.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{platform.platform()}"
    )
    on = measure(True, args.samples, args.settle)
    off = measure(False, args.samples, args.settle)
    print(f"{'daemon idle, reference models loaded':40} {'median MB':>10} {'min':>8} {'max':>8}")
    for name, r in (("web on (api.enabled = true)", on), ("web off (baseline)", off)):
        print(f"{name:40} {r['median_mb']:10.1f} {r['min_mb']:8.1f} {r['max_mb']:8.1f}")
    delta = on["median_mb"] - off["median_mb"]
    verdict = "OK" if on["median_mb"] <= TARGET_MB else "OVER"
    print(f"web server adds {delta:.1f} MB; target <= {TARGET_MB:.0f} MB with web on: {verdict}")
    return 0 if verdict == "OK" else 1


if __name__ == "__main__":
    sys.exit(main())
