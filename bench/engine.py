"""Engine latency: ONNX Runtime vs PyTorch eager on the same CPU, and the Engine wrapper's overhead.

    PYTHONPATH=. python bench/engine.py [--runs 30] [--runs-small 300] [--threads 2] [--skip-densenet]

Prints median and p95 per model for: PyTorch eager (torch.no_grad), a raw ORT session on the compiled
(optimised) model, and the appliance's Engine (runtime.load_engine) on the same artefact; the wrapper
overhead is the median of paired differences (Engine run minus the raw run right beside it, order
alternating) over the raw median, so drift and load from other processes cancel out. Both sessions have
ORT's thread spinning off: two live sessions' spinning workers would otherwise steal each other's CPU.
Models: the reference bundles (cxr-phantom, mmg-phantom; eager timing uses the same architecture with
fresh weights, latency does not depend on weights) and a DenseNet-121 sized net (1x1x512x512), defined
here and exported to ONNX inside the bench. Needs torch (the ``train`` extra). Prints figures only.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def densenet121(in_ch: int = 1, classes: int = 14):
    """DenseNet-121 (growth 32, blocks 6-12-24-16, bottleneck 4, compression 0.5), torchvision layout."""
    import torch
    from torch import nn

    class Dense(nn.Module):
        def __init__(self, cin: int, growth: int = 32, bn: int = 4):
            super().__init__()
            self.f = nn.Sequential(
                nn.BatchNorm2d(cin),
                nn.ReLU(inplace=True),
                nn.Conv2d(cin, bn * growth, 1, bias=False),
                nn.BatchNorm2d(bn * growth),
                nn.ReLU(inplace=True),
                nn.Conv2d(bn * growth, growth, 3, padding=1, bias=False),
            )

        def forward(self, x):
            return torch.cat([x, self.f(x)], 1)

    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    c = 64
    for i, n in enumerate((6, 12, 24, 16)):
        for _ in range(n):
            layers.append(Dense(c))
            c += 32
        if i < 3:
            layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
            c //= 2
    layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    return nn.Sequential(*layers).eval()


def stats(samples: list[float]) -> tuple[float, float]:
    s = sorted(samples)
    return statistics.median(s) * 1e3, s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))] * 1e3


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_model(name: str, onnx_path: Path, torch_model, x: np.ndarray, runs: int, threads: int, work: Path) -> dict:
    import onnxruntime as ort
    import torch

    from engines.backends.ort import OrtEngine, compile_ort

    opt = work / f"{name}.opt.onnx"
    compile_ort(onnx_path, opt, intra_op_threads=threads, inter_op_threads=1)
    # two live sessions: spinning worker threads of one would steal the CPU from the other
    engine = OrtEngine(opt, intra_op_threads=threads, inter_op_threads=1, optimised=True, allow_spinning=False)
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    raw = ort.InferenceSession(str(opt), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in raw.get_outputs()]
    feed = {"image": x}
    tx = torch.from_numpy(x)
    for _ in range(3):  # warm-up
        raw.run(names, feed)
        engine.infer(feed)
        with torch.no_grad():
            torch_model(tx)
    t_raw, t_eng, t_torch, diffs = [], [], [], []
    for i in range(runs):
        a = b = 0.0
        for o in [0, 1] if i % 2 == 0 else [1, 0]:
            if o == 0:
                a = timed(lambda: raw.run(names, feed))
            else:
                b = timed(lambda: engine.infer(feed))
        t_raw.append(a)
        t_eng.append(b)
        diffs.append(b - a)  # paired: both ran back to back, so drift and load cancel out
    with torch.no_grad():
        for _ in range(runs):
            t_torch.append(timed(lambda: torch_model(tx)))
    engine.close()
    r, e, t = stats(t_raw), stats(t_eng), stats(t_torch)
    pair = statistics.median(diffs)
    return {
        "model": name,
        "torch": t,
        "ort_raw": r,
        "engine": e,
        "overhead_us": pair * 1e6,
        "overhead_pct": 100 * pair / statistics.median(t_raw),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30, help="timed runs of the DenseNet-size model")
    ap.add_argument("--runs-small", type=int, default=300, help="timed runs of the reference models")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-densenet", action="store_true")
    args = ap.parse_args()
    import onnxruntime as ort
    import torch

    from training.models import PhantomNet, export_onnx

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        x256 = np.random.default_rng(0).random((1, 1, 256, 256), dtype=np.float32)
        for bid, labels in (("cxr-phantom", 3), ("mmg-phantom", 1)):
            import tarfile

            bundle = next((Path(__file__).resolve().parents[1] / "engines/reference/bundles").glob(f"{bid}-*.bundle"))
            with tarfile.open(bundle) as tar:
                (work / f"{bid}.onnx").write_bytes(tar.extractfile("model.onnx").read())  # type: ignore[union-attr]
            net = PhantomNet(labels).eval()
            rows.append(bench_model(bid, work / f"{bid}.onnx", net, x256, args.runs_small, args.threads, work))
        if not args.skip_densenet:
            dn = densenet121()
            export_onnx(dn, str(work / "densenet.onnx"), input_size=512, output_names=("scores",))
            x512 = np.random.default_rng(0).random((1, 1, 512, 512), dtype=np.float32)
            rows.append(bench_model("densenet121-512", work / "densenet.onnx", dn, x512, args.runs, args.threads, work))
    runs = f"runs={args.runs_small} (reference) / {args.runs} (densenet)"
    print(
        f"# CPU: {platform.processor() or platform.machine()}, threads={args.threads}, {runs}, "
        f"onnxruntime {ort.__version__}, torch {torch.__version__}"
    )
    print(
        "| model (batch 1) | torch eager median / p95 ms | ORT raw median / p95 ms | Engine median / p95 ms "
        "| ORT vs torch | Engine overhead vs raw ORT (median of paired diffs) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['torch'][0]:.1f} / {r['torch'][1]:.1f} | {r['ort_raw'][0]:.1f} / "
            f"{r['ort_raw'][1]:.1f} | {r['engine'][0]:.1f} / {r['engine'][1]:.1f} | "
            f"{r['torch'][0] / r['ort_raw'][0]:.2f}x faster | {r['overhead_us']:+.0f} us ({r['overhead_pct']:+.2f}%) |"
        )


if __name__ == "__main__":
    main()
