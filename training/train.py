"""Train, export, sign and evaluate the reference bundles ``cxr-phantom`` and ``mmg-phantom``.

Developer / central-team tool (needs the ``train`` extra: torch). Reproducible: fixed seeds, CPU, a few
minutes on 2 cores. Run from the repository root::

    python -m training.train            # train both, write bundles + docs/MODELS.md figures
    python -m training.train --eval-only  # re-measure the shipped bundles
    python -m training.train --recalibrate  # new operating points for the shipped models, re-sign
    python -m training.train --reissue    # same bundles, new expiry (``expires``), re-signed; no torch

NOT FOR CLINICAL USE: the models only ever saw synthetic phantoms.

Preprocessing used here is the manifest's (the pipeline must do the same): window to [0, 1] (the DICOM
window of the phantoms is their 0.5-99.5 percentile range), MONOCHROME1 inverted, keep aspect and scale to
fit 256x256 (bilinear, antialiased when shrinking, half-pixel centres), pad centred with 0. With
``nw = round(cols * 256 / max(rows, cols))``, ``scale_x = nw / cols`` and ``pad_x = (256 - nw) // 2`` (same
for y), a point maps back to the original image as ``x_orig = (x_in - pad_x + 0.5) / scale_x - 0.5``.
Heatmap cell (i, j) at stride 4 covers input pixels [4j, 4j + 4): its centre is ``x_in = 4 j + 1.5``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from engines import bundle as B
from engines.contracts import reference_applies_to
from engines.golden import reference_outputs, save_golden
from engines.keys import load_private_key
from engines.reference import phantoms as P

HERE = Path(__file__).resolve().parent.parent / "engines" / "reference"
BUNDLES = HERE / "bundles"
# The DEMO key's private half: public, never shipped (the wheel carries only engines/reference/keys/*.pub).
DEMO_KEY = Path(__file__).resolve().parent / "keys" / "DEMO-ONLY-NOT-FOR-PRODUCTION.ed25519.pem"
# Reference bundles expire (manifest ``expires``) this many days after they are built or re-issued: the demo
# needs a re-issue (``--reissue``) before then.
VALID_DAYS = 3650
SIZE = 256
STRIDE = 4
# 1.0.2: input contract, Patient Orientation, site threshold ranges, drift reference (1.0.1: calibrated thresholds)
VERSION = "1.0.2"


# --------------------------------------------------------------------------------------------------
# Preprocessing and geometry (numpy + torch resize)


def window01(pixels: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> np.ndarray:
    lo, hi = np.percentile(pixels, [lo_pct, hi_pct])
    return np.clip((pixels - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)


def fit_geometry(rows: int, cols: int, size: int = SIZE) -> dict[str, float]:
    scale = size / max(rows, cols)
    nh, nw = max(1, round(rows * scale)), max(1, round(cols * scale))
    return {
        "scale_x": nw / cols,
        "scale_y": nh / rows,
        "nh": nh,
        "nw": nw,
        "pad_x": (size - nw) // 2,
        "pad_y": (size - nh) // 2,
    }


def letterbox(img01: np.ndarray, size: int = SIZE) -> tuple[np.ndarray, dict[str, float]]:
    """Keep-aspect resize (Pillow bilinear: antialiased when shrinking, half-pixel centres) + centred pad."""
    from PIL import Image

    g = fit_geometry(*img01.shape, size)
    r = Image.fromarray(np.ascontiguousarray(img01, dtype=np.float32), mode="F").resize(
        (g["nw"], g["nh"]), Image.Resampling.BILINEAR
    )
    out = np.zeros((size, size), np.float32)
    out[g["pad_y"] : g["pad_y"] + g["nh"], g["pad_x"] : g["pad_x"] + g["nw"]] = np.asarray(r, dtype=np.float32)
    return out, g


def to_input(x: float, y: float, g: dict[str, float]) -> tuple[float, float]:
    return (x + 0.5) * g["scale_x"] - 0.5 + g["pad_x"], (y + 0.5) * g["scale_y"] - 0.5 + g["pad_y"]


def to_original(x_in: float, y_in: float, g: dict[str, float]) -> tuple[float, float]:
    return (x_in - g["pad_x"] + 0.5) / g["scale_x"] - 0.5, (y_in - g["pad_y"] + 0.5) / g["scale_y"] - 0.5


def heatmap_peak(hm: np.ndarray) -> tuple[float, float, float]:
    """(x_in, y_in, value) of the heatmap maximum, refined to sub-cell by a 3x3 weighted centroid."""
    i, j = np.unravel_index(int(np.argmax(hm)), hm.shape)
    i0, i1, j0, j1 = max(i - 1, 0), min(i + 2, hm.shape[0]), max(j - 1, 0), min(j + 2, hm.shape[1])
    win = hm[i0:i1, j0:j1].astype(np.float64)
    w = np.clip(win - win.min(), 0, None)
    if w.sum() <= 0:
        ci, cj = float(i), float(j)
    else:
        ii, jj = np.mgrid[i0:i1, j0:j1]
        ci, cj = float((w * ii).sum() / w.sum()), float((w * jj).sum() / w.sum())
    return STRIDE * cj + (STRIDE - 1) / 2, STRIDE * ci + (STRIDE - 1) / 2, float(hm[i, j])


# --------------------------------------------------------------------------------------------------
# Samples


def cxr_sample(seed: int, rng: np.random.Generator, augment: bool) -> dict[str, Any]:
    rows = int(rng.integers(280, 420))
    cols = int(rows * rng.uniform(0.72, 0.95))
    n_nod = int(rng.choice([0, 0, 1, 1, 2])) if augment else int(rng.choice([0, 1]))
    eff = rng.choice([None, None, "right", "left", "both"]) if augment else rng.choice([None, "right", "left"])
    card = bool(rng.random() < 0.4)
    ph = P.chest_phantom(
        rows, cols, seed=seed, nodules=n_nod, effusion=eff, cardiomegaly=card, noise=float(rng.uniform(0.01, 0.04))
    )
    return _finish(ph, rng, augment, P.CXR_LABELS, "nodule")


def mmg_sample(seed: int, rng: np.random.Generator, augment: bool) -> dict[str, Any]:
    rows = int(rng.integers(240, 340))
    cols = int(rows * rng.uniform(0.75, 0.9))
    lat, view = P.MMG_VIEWS[int(rng.integers(4))]
    masses = int(rng.random() < 0.5)
    ph = P.mammo_phantom(
        rows, cols, laterality=lat, view=view, seed=seed, masses=masses, noise=float(rng.uniform(0.01, 0.035))
    )
    return _finish(ph, rng, augment, P.MMG_LABELS, "mass")


def _finish(ph, rng, augment: bool, labels: tuple[str, ...], point_kind: str) -> dict[str, Any]:
    if augment:
        img = window01(ph.pixels, float(rng.uniform(0, 2)), float(rng.uniform(98, 100)))
        img = np.clip(img ** float(rng.uniform(0.8, 1.25)), 0, 1)
    else:
        img = window01(ph.pixels)
    x, g = letterbox(img)
    target = np.zeros((SIZE // STRIDE, SIZE // STRIDE), np.float32)
    yy, xx = np.mgrid[0 : SIZE // STRIDE, 0 : SIZE // STRIDE]
    points = []
    for f in ph.truth["findings"]:
        if f["kind"] != point_kind:
            continue
        xi, yi = to_input(*f["center_xy"], g)
        cx, cy = (xi - (STRIDE - 1) / 2) / STRIDE, (yi - (STRIDE - 1) / 2) / STRIDE
        sigma = max(0.8, 0.5 * f["radius"] * g["scale_x"] / STRIDE)
        target = np.maximum(target, np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2)))
        points.append(f["center_xy"])
    y = np.array([ph.truth["labels"][k] for k in labels], np.float32)
    return {"x": x, "y": y, "target": target, "geom": g, "points": points, "truth": ph.truth}


def dataset(kind: str, n: int, seed: int, augment: bool) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    make = cxr_sample if kind == "cxr" else mmg_sample
    return [make(seed * 100_000 + i, rng, augment) for i in range(n)]


# --------------------------------------------------------------------------------------------------
# Training


def train(kind: str, n_train: int, epochs: int, seed: int = 1234, log=print):
    import torch
    from torch.nn import functional as F

    from training.models import PhantomNet

    torch.manual_seed(seed)
    torch.set_num_threads(2)
    labels = P.CXR_LABELS if kind == "cxr" else P.MMG_LABELS
    t0 = time.time()
    data = dataset(kind, n_train, seed, augment=True)
    log(f"[{kind}] generated {n_train} phantoms in {time.time() - t0:.1f}s")
    X = torch.from_numpy(np.stack([d["x"] for d in data]))[:, None]
    Y = torch.from_numpy(np.stack([d["y"] for d in data]))
    T = torch.from_numpy(np.stack([d["target"] for d in data]))
    net = PhantomNet(len(labels))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((n_train + 31) // 32)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.2)
    gen = torch.Generator().manual_seed(seed)
    for ep in range(epochs):
        net.train()
        perm = torch.randperm(n_train, generator=gen)
        tot = 0.0
        for k in range(0, n_train, 32):
            idx = perm[k : k + 32]
            x, y, t = X[idx], Y[idx], T[idx]
            if kind == "mmg":  # the model must not care which side the chest wall is on
                flip = torch.rand(len(idx), generator=gen) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                t = torch.where(flip[:, None, None], t.flip(-1), t)
            scores, cam = net(x)
            loss = F.binary_cross_entropy_with_logits(scores, y)
            # dense supervision of the point-finding map (nodule / mass), positives up-weighted
            w = 1.0 + 20.0 * t
            loss = loss + 2.0 * F.binary_cross_entropy_with_logits(cam[:, 0], t, weight=w)
            # the other maps are class-activation maps: log-sum-exp pooled to the image label
            for c in range(1, len(labels)):
                pooled = torch.logsumexp(cam[:, c].flatten(1) * 4.0, dim=1) / 4.0 - np.log(cam.shape[-1] ** 2) / 4.0
                loss = loss + 0.5 * F.binary_cross_entropy_with_logits(pooled, y[:, c])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
        log(f"[{kind}] epoch {ep + 1}/{epochs} loss {tot / n_train:.4f} ({time.time() - t0:.0f}s)")
    return net.eval()


# --------------------------------------------------------------------------------------------------
# Bundles


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def calibrate(kind: str, onnx_path: Path, n: int = 300, seed: int = 555) -> dict[str, float]:
    """Per-label operating point: the threshold maximising Youden's J (sensitivity + specificity - 1).

    Measured on a validation set disjoint from the training (seed 1234), golden (999) and evaluation (777)
    sets. Why: the sigmoid scores of a small net trained on few positives are not calibrated (nodule
    positives score ~0.25-0.45), so a blanket 0.5 would report no finding at all.
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    labels = P.CXR_LABELS if kind == "cxr" else P.MMG_LABELS
    data = dataset(kind, n, seed, augment=False)
    scores = np.concatenate(
        [
            _sigmoid(sess.run(["scores"], {"image": np.stack([d["x"] for d in data[k : k + 32]])[:, None]})[0])
            for k in range(0, len(data), 32)
        ]
    )
    truth = np.stack([d["y"] for d in data])
    out = {}
    for i, label in enumerate(labels):
        s, y = scores[:, i], truth[:, i]
        cand = np.unique(s)
        cuts = (cand[:-1] + cand[1:]) / 2 if len(cand) > 1 else cand
        j = [(s[y == 1] >= c).mean() + (s[y == 0] < c).mean() - 1 for c in cuts]
        out[label] = round(float(cuts[int(np.argmax(j))]), 3)
    return out


def manifest_for(kind: str, thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    pre = {
        "target_size": [SIZE, SIZE],
        "keep_aspect": True,
        "pad_value": 0.0,
        "window": "dicom",
        "invert_monochrome1": True,
        "mean": 0.0,
        "std": 1.0,
    }
    tol = {"fp32": {"atol": 1e-4, "rtol": 1e-3}, "fp16": {"atol": 5e-2, "rtol": 5e-2}}
    if kind == "cxr":
        labels = list(P.CXR_LABELS)
        applies = reference_applies_to("cxr")  # with its input contract (issue 16); 1.0.1 had none
        title = "Chest X-ray phantom findings (reference model) - NOT FOR CLINICAL USE"
    else:
        labels = list(P.MMG_LABELS)
        applies = reference_applies_to("mmg")
        title = "Mammography phantom mass score per view (reference model) - NOT FOR CLINICAL USE"
    return {
        "bundle_id": f"{kind}-phantom",
        "version": VERSION,
        "task": kind,
        "title": title,
        "clinical_use": False,
        "applies_to": applies,
        "inputs": [{"name": "image", "shape": ["N", 1, SIZE, SIZE], "dtype": "float32", "preprocessing": pre}],
        "outputs": [
            {
                "name": "scores",
                "kind": "scores",
                "labels": labels,
                "activation": "sigmoid",
                "thresholds": thresholds or dict.fromkeys(labels, 0.5),
            },
            {"name": "heatmap", "kind": "heatmap", "labels": labels, "activation": "none", "stride": STRIDE},
        ],
        "golden_tolerances": {"scores": tol, "heatmap": tol},
        "min_appliance_version": "0.1.0",
    }


def _write_bundle(kind: str, onnx_path: Path, golden: Path, out_dir: Path, key_path: Path) -> Path:
    """Calibrate on the exported model, build the bundle, sign it with the demo key."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{kind}-phantom-{VERSION}.bundle"
    B.build_bundle(
        out,
        manifest_for(kind, calibrate(kind, onnx_path)),
        {"model.onnx": onnx_path, "golden.npz": golden},
        valid_days=VALID_DAYS,
    )
    B.sign_bundle(out, load_private_key(key_path))
    return out


def build_reference_bundle(kind: str, net, out_dir: Path = BUNDLES, key_path: Path = DEMO_KEY) -> Path:
    from training.models import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(net, str(onnx_path))
        golden_in = {"image": np.stack([d["x"] for d in dataset(kind, 4, 999, augment=False)])[:, None]}
        save_golden(Path(tmp) / "golden.npz", golden_in, reference_outputs(onnx_path, golden_in))
        return _write_bundle(kind, onnx_path, Path(tmp) / "golden.npz", out_dir, key_path)


def recalibrate_bundle(kind: str, old: Path, out_dir: Path = BUNDLES, key_path: Path = DEMO_KEY) -> Path:
    """The same model and golden data as ``old`` with new operating points, as version ``VERSION``."""
    import tarfile

    with tempfile.TemporaryDirectory() as tmp, tarfile.open(old) as tar:
        for name in ("model.onnx", "golden.npz"):
            (Path(tmp) / name).write_bytes(tar.extractfile(name).read())  # type: ignore[union-attr]
        out = _write_bundle(kind, Path(tmp) / "model.onnx", Path(tmp) / "golden.npz", out_dir, key_path)
    if old.resolve() != out.resolve():
        old.unlink()
    return out


def reissue_bundle(old: Path, key_path: Path = DEMO_KEY, valid_days: int = VALID_DAYS) -> Path:
    """The same model, golden data and manifest (thresholds, tolerances, everything the pipeline reads) as
    ``old``, with a new ``created``/``expires`` and the current manifest format (``file_sizes``), re-signed in
    place. No torch needed: nothing is trained or recalibrated."""
    import tarfile

    with tempfile.TemporaryDirectory() as tmp, tarfile.open(old) as tar:
        doc = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        names = sorted(doc["files"])
        for name in names:
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).write_bytes(tar.extractfile(name).read())  # type: ignore[union-attr]
        for key in ("files", "file_sizes", "created", "expires"):
            doc.pop(key, None)
        out = Path(tmp) / "new.bundle"
        B.build_bundle(out, doc, {name: Path(tmp) / name for name in names}, valid_days=valid_days)
        B.sign_bundle(out, load_private_key(key_path), old)
    return old


# Patient Orientation the reference models were trained on (the phantoms' own, as stored): chest rows toward the
# patient's left, columns toward the feet; mammograms as displayed, the chest wall at the image edge
# (``appliance.pipeline.preprocess`` brings other stored orientations to these; docs/MODELS.md).
ORIENTATION: dict[str, dict[str, Any]] = {
    "cxr": {"*": {"rows": ["L"], "columns": ["F"]}},
    "mmg": {
        "L": {"rows": ["A"], "columns": ["F", "R"], "oblique": True},
        "R": {"rows": ["P"], "columns": ["F", "L"], "oblique": True},
    },
}
# The range the central team may move each label's operating point in, per site (OutputSpec.threshold_range):
# 0.05..0.95 of the calibrated score; outside it the validation set holds too few cases on one side to judge.
THRESHOLD_RANGE = (0.05, 0.95)


def validation_reference(kind: str, manifest: dict[str, Any], model: Path, n_studies: int, seed: int = 4242) -> dict:
    """The manifest ``reference`` block (``engines.drift.reference_distributions``) of ``n_studies`` phantom
    studies written as DICOM and run through the box's own pipeline (``appliance.pipeline.analyse``: the same
    preprocessing, scores and input statistics the box counts), with the model at ``model``."""
    from pydicom import dcmread

    from appliance.pipeline.analyse import analyse
    from appliance.pipeline.observe import input_summary
    from engines.backends.ort import OrtEngine
    from engines.drift import reference_distributions
    from engines.manifest import Manifest

    m = Manifest.model_validate(
        {
            **manifest,
            "created": "2026-01-01T00:00:00Z",
            "expires": "2027-01-01T00:00:00Z",
            "files": {"model.onnx": "0" * 64, "golden.npz": "0" * 64},
            "file_sizes": {"model.onnx": 0, "golden.npz": 0},
        }
    )
    engine = OrtEngine(model, max_batch=8)
    rng = np.random.default_rng(seed)
    scores: dict[str, list[float]] = {}
    study_scores: list[float] = []
    means: list[float] = []
    p95s: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n_studies):
            if kind == "cxr":
                st = P.chest_study(
                    tmp,
                    seed=seed + i,
                    nodules=int(rng.integers(0, 2)),
                    effusion=[None, "left", "right"][int(rng.integers(0, 3))],
                    cardiomegaly=bool(rng.random() < 0.3),
                )
            else:
                st = P.mammo_study(tmp, seed=seed + i, masses={s: int(rng.integers(0, 2)) for s in ("L", "R")})
            images = [dcmread(f) for f in st["files"]]
            a = analyse(images, m, engine.infer, engine.max_batch, max_pixels=100_000_000)
            study_scores.append(float(a.result.study_score))
            for img in a.result.images:
                for f in img.findings:
                    scores.setdefault(f.label, []).append(float(f.score))
            for prep in a.prepared:
                mean, p95 = input_summary(prep, m.input.preprocessing)
                means.append(mean)
                p95s.append(p95)
    return reference_distributions(scores, study_scores, means, p95s)


def reissue_as(old: Path, version: str, n_reference: int, key_path: Path = DEMO_KEY) -> Path:
    """The model and golden data of ``old`` as a new version: the current reference manifest (input contract,
    Patient Orientation, site threshold ranges), the calibrated thresholds of ``old``, and the validation-set
    reference distributions for drift (``n_reference`` phantom studies through the box's pipeline). No torch."""
    import tarfile

    from appliance import __version__

    kind = "cxr" if old.name.startswith("cxr") else "mmg"
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(old) as tar:
        doc = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        for name in ("model.onnx", "golden.npz"):
            (Path(tmp) / name).write_bytes(tar.extractfile(name).read())  # type: ignore[union-attr]
        thresholds = next(o for o in doc["outputs"] if o["kind"] == "scores")["thresholds"]
        manifest = manifest_for(kind, thresholds)
        manifest["version"] = version
        manifest["min_appliance_version"] = __version__
        manifest["inputs"][0]["preprocessing"]["orientation"] = ORIENTATION[kind]
        for out in manifest["outputs"]:
            if out["kind"] == "scores":
                out["threshold_range"] = {label: list(THRESHOLD_RANGE) for label in out["labels"]}
        manifest["reference"] = validation_reference(kind, manifest, Path(tmp) / "model.onnx", n_reference)
        out_path = old.parent / f"{kind}-phantom-{version}.bundle"
        B.build_bundle(
            out_path, manifest, {n: Path(tmp) / n for n in ("model.onnx", "golden.npz")}, valid_days=VALID_DAYS
        )
        B.sign_bundle(out_path, load_private_key(key_path))
    if old.resolve() != out_path.resolve():
        old.unlink()
    return out_path


# --------------------------------------------------------------------------------------------------
# Evaluation (ONNX Runtime on the bundle's own model.onnx)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def evaluate(kind: str, bundle_path: Path, n: int = 300, seed: int = 777, real_size: int = 0) -> dict[str, Any]:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        import tarfile

        with tarfile.open(bundle_path) as tar:
            model = tar.extractfile("model.onnx").read()  # type: ignore[union-attr]
        (Path(tmp) / "m.onnx").write_bytes(model)
        sess = ort.InferenceSession(str(Path(tmp) / "m.onnx"), providers=["CPUExecutionProvider"])
    labels = P.CXR_LABELS if kind == "cxr" else P.MMG_LABELS
    data = dataset(kind, n, seed, augment=False)
    if real_size:  # a few full-size images, to check the model transfers to detector resolution
        rng = np.random.default_rng(seed + 1)
        for i in range(real_size):
            if kind == "cxr":
                ph = P.chest_phantom(*P.CHEST_SIZE_REAL, seed=seed * 7 + i, nodules=1, effusion=None)
                data.append(_finish(ph, rng, False, labels, "nodule"))
    scores, small, large = [], [], []
    for k in range(0, len(data), 32):
        chunk = data[k : k + 32]
        s, hm = sess.run(["scores", "heatmap"], {"image": np.stack([d["x"] for d in chunk])[:, None]})
        scores.append(s)
        for d, h in zip(chunk, hm, strict=True):
            if len(d["points"]) == 1:
                xi, yi, _ = heatmap_peak(h[0])
                xo, yo = to_original(xi, yi, d["geom"])
                tx, ty = d["points"][0]
                dist = float(np.hypot(xo - tx, yo - ty))
                size = max(d["truth"]["rows"], d["truth"]["columns"])
                (large if size > 1000 else small).append((dist, dist / size))
    S = np.concatenate(scores)
    Y = np.stack([d["y"] for d in data])
    out: dict[str, Any] = {
        "n_images": len(data),
        "auc": {lab: round(auc(S[:, i], Y[:, i]), 4) for i, lab in enumerate(labels)},
    }
    for name, rows in (("peak_distance", small), ("peak_distance_full_size", large)):
        if rows:
            a, r = np.array([x[0] for x in rows]), np.array([x[1] for x in rows])
            out[name] = {
                "finding": labels[0],
                "n": len(a),
                "median_px": round(float(np.median(a)), 2),
                "p95_px": round(float(np.percentile(a, 95)), 2),
                "median_pct_of_size": round(100 * float(np.median(r)), 2),
                "p95_pct_of_size": round(100 * float(np.percentile(r, 95)), 2),
                "within_2pct": round(float((r <= 0.02).mean()), 4),
            }
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--recalibrate", action="store_true", help="new thresholds for the shipped models, no training")
    ap.add_argument(
        "--reissue", action="store_true", help="re-sign the shipped bundles unchanged with a new expiry (no eval)"
    )
    ap.add_argument(
        "--reissue-as", metavar="VERSION", help="the shipped models as a new version with the current manifest fields"
    )
    ap.add_argument("--n-reference", type=int, default=200, help="phantom studies for the drift reference")
    ap.add_argument("--only", choices=["cxr", "mmg"])
    ap.add_argument("--n-train", type=int, default=1200)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--n-eval", type=int, default=300)
    ap.add_argument("--metrics", type=Path, default=HERE / "metrics.json")
    args = ap.parse_args(argv)
    metrics = json.loads(args.metrics.read_text()) if args.metrics.exists() else {}
    for kind in [args.only] if args.only else ["cxr", "mmg"]:
        path = BUNDLES / f"{kind}-phantom-{VERSION}.bundle"
        if args.reissue_as:
            old = sorted(BUNDLES.glob(f"{kind}-phantom-*.bundle"))[-1]
            path = reissue_as(old, args.reissue_as, args.n_reference)
            print(f"[{kind}] {old.name} -> {path.name}")
            if kind in metrics:
                metrics[kind]["bundle"], metrics[kind]["bundle_bytes"] = path.name, path.stat().st_size
            continue
        if args.reissue:
            print(f"[{kind}] re-issued {reissue_bundle(path).name}")
            if kind in metrics:
                metrics[kind]["bundle_bytes"] = path.stat().st_size
            continue
        if args.recalibrate:
            old = sorted(BUNDLES.glob(f"{kind}-phantom-*.bundle"))[-1]
            path = recalibrate_bundle(kind, old)
            print(f"[{kind}] {old.name} -> {path.name}")
        elif not args.eval_only:
            t0 = time.time()
            net = train(kind, args.n_train, args.epochs)
            path = build_reference_bundle(kind, net)
            print(f"[{kind}] bundle {path} ({path.stat().st_size / 1e6:.2f} MB) in {time.time() - t0:.0f}s")
        m = evaluate(kind, path, args.n_eval, real_size=20 if kind == "cxr" else 0)
        m["bundle"] = path.name
        m["bundle_bytes"] = path.stat().st_size
        metrics[kind] = m
        print(f"[{kind}] {json.dumps(m)}")
    args.metrics.write_text(json.dumps(metrics, indent=2) + "\n")


if __name__ == "__main__":
    main()
