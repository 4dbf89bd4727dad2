"""Probe a GPU box the way the appliance's engines see it; prints figures, asserts nothing.

Run on a machine with an NVIDIA GPU (and pycuda importable) to check the parts of the TensorRT path that
do not need TensorRT itself: backend selection and its reason, the GPU fingerprint that keys the engine
cache, the pinned-host/device-buffer/stream plumbing :class:`engines.backends.tensorrt.TrtEngine` uses
(round trip exactness and copy times for the reference input size), and the reference bundles installed,
compiled and golden-checked on this machine's CPU with ONNX Runtime (a different CPU ISA gives a
different cache key).

    PYTHONPATH=. python bench/gpu_probe.py [--reps 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from engines.backends import select_backend, tensorrt
from engines.cache import cpu_fingerprint
from engines.keys import TrustStore, read_public_key_file
from engines.runtime import EngineOptions, compile_engine, install_bundle

REF = Path(__file__).resolve().parents[1] / "engines" / "reference"


def _ms(samples: list[float]) -> str:
    return f"median {statistics.median(samples) * 1e3:.3f} ms, p95 {np.percentile(samples, 95) * 1e3:.3f} ms"


def probe_buffers(shape: tuple[int, ...], reps: int) -> dict[str, str]:
    """Pinned host <-> device round trip on one stream, as TrtEngine does it."""
    import pycuda.driver as cuda

    ctx = tensorrt._Context(0)
    with ctx:
        host_in = cuda.pagelocked_empty(int(np.prod(shape)), np.float32)
        host_out = cuda.pagelocked_empty(int(np.prod(shape)), np.float32)
        dev = cuda.mem_alloc(host_in.nbytes)
        stream = cuda.Stream()
        rng = np.random.default_rng(0)
        h2d, d2h = [], []
        exact = True
        for _ in range(reps):
            data = rng.standard_normal(int(np.prod(shape)), dtype=np.float32)
            host_in[:] = data
            t0 = time.perf_counter()
            cuda.memcpy_htod_async(dev, host_in, stream)
            stream.synchronize()
            t1 = time.perf_counter()
            cuda.memcpy_dtoh_async(host_out, dev, stream)
            stream.synchronize()
            t2 = time.perf_counter()
            exact &= bool(np.array_equal(host_out, data))
            h2d.append(t1 - t0)
            d2h.append(t2 - t1)
        dev.free()
    ctx.detach()
    mb = host_in.nbytes / 1e6
    return {"shape": str(shape), "MB": f"{mb:.2f}", "exact": str(exact), "h2d": _ms(h2d), "d2h": _ms(d2h)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    ok, why = tensorrt.available()
    print(f"tensorrt.available: {ok} {why}")
    print(f"select_backend('auto') -> {select_backend('auto')}")
    try:
        print("gpu_fingerprint:", json.dumps(tensorrt.gpu_fingerprint()))
        for shape in [(1, 1, 256, 256), (4, 1, 256, 256), (1, 1, 512, 512)]:
            print("buffers:", json.dumps(probe_buffers(shape, args.reps)))
    except ImportError as exc:
        print(f"pycuda not importable: {exc}")
    print("cpu_fingerprint:", json.dumps(cpu_fingerprint()))
    kid, b64 = read_public_key_file(REF / "keys" / "DEMO-ONLY.pub")
    trust = TrustStore.from_config({kid: b64})
    opts = EngineOptions(backend="ort")
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        for bundle in sorted((REF / "bundles").glob("*.bundle")):
            t0 = time.perf_counter()
            v = install_bundle(models, bundle, trust, opts)
            t1 = time.perf_counter()
            res = compile_engine(models, v.manifest.bundle_id, opts, trust=trust)
            golden = "pass" if res.golden.passed else f"FAIL {res.golden}"
            print(
                f"bundle {v.manifest.bundle_id}@{v.manifest.version}: install+compile+golden {t1 - t0:.2f} s, "
                f"reload cache_hit={res.cache_hit}, golden {golden}"
            )
            res.engine.close()


if __name__ == "__main__":
    main()
