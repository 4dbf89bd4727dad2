"""Compiled engines cached on disk, keyed by everything that makes a compiled artefact valid.

Key = sha256 of {bundle digest (signed manifest, which pins the ONNX), backend + its version, hardware
fingerprint (GPU name + compute capability + L4T release, or CPU architecture + ISA flags), precision,
profile (batch range, threads)}. A TensorRT plan only runs on the GPU and TensorRT version that built it;
an ORT-optimised model only on the same ISA: a changed key simply misses. An entry whose files are
missing, truncated or altered is removed and rebuilt, never fatal.

Layout: ``<models_dir>/cache/<bundle_id>/<key[:24]>/{artefact, entry.json}``; the directory is built
under a temp name and renamed into place, entry.json (with the artefact's sha256) written last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from durable import replace_durably, write_atomic
from engines.bundle import sha256_file

log = logging.getLogger(__name__)

_ISA_FLAGS = {
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "avx_vnni",
    "asimd",
    "asimdhp",
    "asimddp",
    "sve",
    "sve2",
    "i8mm",
    "bf16",
    "fphp",  # aarch64 (Jetson)
}


def cpu_fingerprint() -> dict[str, str]:
    """CPU architecture and the ISA extensions that change which kernels ORT picks."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags |= set(value.split())
    except OSError:
        pass
    return {"arch": platform.machine(), "isa": ",".join(sorted(flags & _ISA_FLAGS))}


@dataclass(frozen=True)
class CacheKey:
    bundle_digest: str
    backend: str
    backend_version: str
    hardware: dict[str, str] = field(default_factory=dict)
    precision: str = "fp32"
    profile: dict[str, Any] = field(default_factory=dict)

    def digest(self) -> str:
        doc = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(doc.encode()).hexdigest()


class EngineCache:
    ARTEFACT = "artefact"
    ENTRY = "entry.json"

    def __init__(self, root: Path):
        self.root = Path(root)

    def entry_dir(self, bundle_id: str, key: CacheKey) -> Path:
        return self.root / bundle_id / key.digest()[:24]

    def lookup(self, bundle_id: str, key: CacheKey) -> tuple[Path | None, str]:
        """(artefact path, "") on a valid hit; (None, why) on a miss. A bad entry is deleted."""
        d = self.entry_dir(bundle_id, key)
        if not d.exists():
            return None, "miss"
        try:
            entry = json.loads((d / self.ENTRY).read_text(encoding="utf-8"))
            if entry.get("key") != key.digest():
                raise ValueError("key mismatch")
            art = d / self.ARTEFACT
            if sha256_file(art) != entry.get("artefact_sha256"):
                raise ValueError("artefact checksum mismatch")
            return art, ""
        except (OSError, ValueError, KeyError, TypeError) as exc:
            why = f"corrupt cache entry ({exc.__class__.__name__}: {exc})"
            log.warning("engine cache entry unusable, rebuilding: %s %s", d, why)
            self.invalidate(bundle_id, key)
            return None, why

    def store(self, bundle_id: str, key: CacheKey, artefact: Path, info: dict[str, Any] | None = None) -> Path:
        """Move ``artefact`` into the cache atomically; returns its new path."""
        final = self.entry_dir(bundle_id, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            shutil.move(str(artefact), tmp / self.ARTEFACT)
            entry = {
                "key": key.digest(),
                "key_fields": asdict(key),
                "artefact_sha256": sha256_file(tmp / self.ARTEFACT),
            }
            entry.update(info or {})
            (tmp / self.ENTRY).write_text(json.dumps(entry, indent=2, sort_keys=True), encoding="utf-8")
            for f in (tmp / self.ARTEFACT, tmp / self.ENTRY):
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            if final.exists():
                shutil.rmtree(final)
            replace_durably(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final / self.ARTEFACT

    def update_info(self, bundle_id: str, key: CacheKey, info: dict[str, Any]) -> None:
        path = self.entry_dir(bundle_id, key) / self.ENTRY
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        entry.update(info)
        write_atomic(path, json.dumps(entry, indent=2, sort_keys=True).encode("utf-8"))

    def invalidate(self, bundle_id: str, key: CacheKey) -> None:
        shutil.rmtree(self.entry_dir(bundle_id, key), ignore_errors=True)

    def entries(self) -> list[dict[str, Any]]:
        """Every readable entry (for ``appliance engine list``)."""
        out: list[dict[str, Any]] = []
        if not self.root.exists():
            return out
        for entry in sorted(self.root.glob("*/*/entry.json")):
            try:
                doc = json.loads(entry.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                doc = {"corrupt": True}
            doc["bundle_id"] = entry.parent.parent.name
            doc["path"] = str(entry.parent)
            doc["size"] = (
                (entry.parent / self.ARTEFACT).stat().st_size if (entry.parent / self.ARTEFACT).exists() else 0
            )
            out.append(doc)
        return out
