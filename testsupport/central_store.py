"""A results store written the way the contract (docs/CENTRAL.md, "Central store") lays it out, from synthetic rows:
Parquet through pyarrow, hive-partitioned ``<table>/date=YYYY-MM-DD/bundle=<id>@<version>/part-0.parquet``, with
``_schema.json``. The rows are returned as plain Python so tests can compute the expected numbers themselves.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from appliance.central import store_schema

TS = pa.timestamp("us", tz="UTC")
SCHEMAS: dict[str, pa.Schema] = store_schema.TABLES  # the published store schema

BUNDLE = ("cxr-phantom", "1.0.1")
LABELS = ("nodule", "effusion")
THRESHOLD = 0.5
# device -> site tags; "box-x" has no twin tags (site NULL), "box-s" is the shifted site
DEVICES: dict[str, dict[str, str | None]] = {
    "box-n": {"site": "north", "region": "r1", "health_system": "hs1", "setting": "rural"},
    "box-s": {"site": "south", "region": "r1", "health_system": "hs1", "setting": "urban"},
    "box-s2": {"site": "south", "region": "r1", "health_system": "hs1", "setting": "urban"},
    "box-x": {"site": None, "region": None, "health_system": None, "setting": None},
}
START = dt.datetime(2025, 1, 6, tzinfo=dt.timezone.utc)  # a Monday


@dataclass
class Fixture:
    """The rows written, per table, as dicts with the contract's columns."""

    root: Path
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))


def write_schema_marker(root: Path, version: int = 1) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "_schema.json").write_text(json.dumps({"name": "clinicai-store", "version": version}))


def write_tables(root: Path, rows: dict[str, list[dict[str, Any]]]) -> None:
    """Write ``rows`` (table -> row dicts) hive-partitioned by UTC date of enqueued_time and bundle."""
    for table, items in rows.items():
        parts: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for row in items:
            date = row["enqueued_time"].astimezone(dt.timezone.utc).date().isoformat()
            parts[(date, f"{row['bundle_id']}@{row['bundle_version']}")].append(row)
        for (date, bundle), part in parts.items():
            folder = root / table / f"date={date}" / f"bundle={bundle}"
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(part, SCHEMAS[table]), folder / "part-0.parquet")


def make_store(root: Path, seed: int = 17, studies_per_device_day: int = 25) -> Fixture:
    """A store of 3 weeks (2025-01-06 ..) from 4 devices: site "north", site "south" (two boxes; its scores are
    shifted higher), and one box without twin tags (site NULL); one bundle with two labels. Every result has 1-2
    images with findings for both labels; about half the results have feedback (verdicts, some revised, and
    outcomes with and without a label); stats hold two snapshots per device-day (only the later one counts)."""
    rng = np.random.default_rng(seed)
    fx = Fixture(root)
    bid, ver = BUNDLE
    n = 0
    for day in range(21):
        for device, tags in DEVICES.items():
            shift = 2.0 if tags["site"] == "south" else 0.0
            images_today = 0
            for k in range(studies_per_device_day):
                n += 1
                when = START + dt.timedelta(days=day, minutes=30 + 50 * k, microseconds=int(rng.integers(0, 10**6)))
                mid = f"m{n:05d}"
                n_images = int(rng.integers(1, 3))
                images_today += n_images
                study = f"2.25.{n}"
                max_scores = {}
                for i in range(n_images):
                    for label in LABELS:
                        score = float(rng.beta(2.0 + shift, 5.0))
                        max_scores[label] = max(max_scores.get(label, 0.0), score)
                        fx.rows["findings"].append(
                            dict(mid=mid, device=device, site=tags["site"], enqueued_time=when, bundle_id=bid,
                                 bundle_version=ver, study=study, image=f"{study}.{i}", label=label, score=score,
                                 positive=score >= THRESHOLD, threshold=THRESHOLD, threshold_source="manifest")
                        )  # fmt: skip
                study_score = max(max_scores.values())
                fx.rows["results"].append(
                    dict(mid=mid, device=device, enqueued_time=when, bundle_id=bid, bundle_version=ver, study=study,
                         modality="DX", task="cxr", study_score=study_score, urgent=study_score >= 0.8,
                         n_images=n_images, n_refused=int(rng.integers(0, 2)), operating_point_version=None,
                         schema="result/v1", **tags)
                )  # fmt: skip
                _feedback(fx, rng, mid, device, tags["site"], when, study, max_scores)
            _stats(fx, rng, device, tags, START.date() + dt.timedelta(days=day), images_today)
    write_schema_marker(root)
    write_tables(root, fx.rows)
    return fx


def _feedback(fx: Fixture, rng: np.random.Generator, mid: str, device: str, site: str | None,
              when: dt.datetime, study: str, max_scores: dict[str, float]) -> None:  # fmt: skip
    bid, ver = BUNDLE
    base = dict(device=device, site=site, bundle_id=bid, bundle_version=ver, result_mid=mid, study=study)
    later = when + dt.timedelta(days=1)
    if rng.random() < 0.6:
        for label in LABELS:
            if rng.random() < 0.7:
                verdict = str(rng.choice(["agree", "agree", "agree", "disagree", "uncertain"]))
                if rng.random() < 0.2:  # an earlier verdict, revised later: only the newest counts
                    fx.rows["feedback"].append(
                        dict(base, mid=f"fb-{mid}-{label}-0", enqueued_time=later - dt.timedelta(hours=3),
                             kind="finding", label=label, verdict="disagree" if verdict == "agree" else "agree",
                             outcome_code=None, outcome_positive=None)
                    )  # fmt: skip
                fx.rows["feedback"].append(
                    dict(base, mid=f"fb-{mid}-{label}-1", enqueued_time=later, kind="finding", label=label,
                         verdict=verdict, outcome_code=None, outcome_positive=None)
                )  # fmt: skip
    if rng.random() < 0.3:
        label = str(rng.choice(["nodule", ""]))
        positive = bool(rng.random() < max_scores["nodule"] + 0.1)
        fx.rows["feedback"].append(
            dict(base, mid=f"fo-{mid}", enqueued_time=later + dt.timedelta(days=3), kind="outcome",
                 label=label or None, verdict=None, outcome_code="biopsy_malignant" if positive else "biopsy_benign",
                 outcome_positive=positive)
        )  # fmt: skip


def _stats(fx: Fixture, rng: np.random.Generator, device: str, tags: dict[str, str | None], day: dt.date,
           images: int) -> None:  # fmt: skip
    bid, ver = BUNDLE
    for snap, final in ((0, False), (1, True)):
        generated = dt.datetime.combine(day, dt.time(12 if not final else 23, 59), dt.timezone.utc)
        mid = f"st-{device}-{day.isoformat()}-{snap}"
        scale = 1 if final else 0  # the early snapshot undercounts: it must not be what the report uses
        counts = {("count:images", ""): images * scale + (0 if final else 1)}
        for reason in ("wrong_modality", "low_resolution"):
            counts[("refusals", reason)] = int(rng.integers(0, 3)) + (5 if not final else 0)
        for (metric, key), c in counts.items():
            fx.rows["stats"].append(
                dict(mid=mid, device=device, enqueued_time=generated + dt.timedelta(minutes=5), bundle_id=bid,
                     bundle_version=ver, day=day, generated_at=generated, metric=metric, key=key, count=c, **tags)
            )  # fmt: skip


# -- IoT Hub routing Avro files and a stand-in for the ingest's per-record open/flatten step --------------------

# The Avro schema IoT Hub's routing to a storage endpoint writes (Microsoft.Azure.Devices.Message).
HUB_AVRO_SCHEMA = {
    "type": "record",
    "name": "Message",
    "namespace": "Microsoft.Azure.Devices",
    "fields": [
        {"name": "EnqueuedTimeUtc", "type": "string"},
        {"name": "Properties", "type": {"type": "map", "values": "string"}},
        {"name": "SystemProperties", "type": {"type": "map", "values": "string"}},
        {"name": "Body", "type": ["null", "bytes"]},
    ],
}


def hub_record(device: str, body: bytes, enqueued: dt.datetime) -> dict[str, Any]:
    """One routed message as IoT Hub's Avro has it (system property connectionDeviceId: the authenticated sender)."""
    return {
        "EnqueuedTimeUtc": enqueued.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z"),
        "Properties": {},
        "SystemProperties": {"connectionDeviceId": device, "contentType": "application/json"},
        "Body": body,
    }


def write_avro(path: Path, records: list[dict[str, Any]]) -> None:
    import fastavro

    with open(path, "wb") as fh:
        fastavro.writer(fh, fastavro.parse_schema(HUB_AVRO_SCHEMA), records)


def sealed_result(recipients: dict[str, str], device: str, mid: str, study: str, scores: dict[str, float]) -> bytes:
    """A result envelope as the box sends it (appliance.cloud.crypto), de-identified fields only."""
    from appliance.cloud import crypto

    bid, ver = BUNDLE
    payload = {
        "schema": "result/v1", "study_uid": study, "modality": "DX", "bundle_id": bid, "bundle_version": ver,
        "task": "cxr", "study_score": max(scores.values()), "per_breast": None,
        "images": [{"sop_instance_uid": f"{study}.1"}],
        "findings": [
            {"label": lb, "score": s, "positive": s >= THRESHOLD, "image_sop_uid": f"{study}.1", "location": None,
             "threshold": THRESHOLD, "threshold_source": "manifest"}
            for lb, s in scores.items()
        ],
        "operating_point_version": None, "refused_images": [],
    }  # fmt: skip
    meta = {"type": "result", "schema": "result/v1", "mid": mid, "device": device}
    plain = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return crypto.encrypt(plain, meta, recipients)
