"""Inference backends behind one interface (:class:`engines.backends.base.Engine`), picked by name.

``auto`` = TensorRT when it is importable and a GPU is present, else ONNX Runtime on the CPU.
"""

from __future__ import annotations

from engines.backends.base import Engine
from engines.errors import EngineBuildError

BACKENDS = ("ort", "tensorrt")


def select_backend(requested: str = "auto") -> str:
    """Resolve "auto"/"ort"/"tensorrt" to a backend that can run here; an explicit unusable one is an error."""
    if requested == "ort":
        return "ort"
    from engines.backends import tensorrt

    ok, why = tensorrt.available()
    if requested == "tensorrt":
        if not ok:
            raise EngineBuildError("backend_unavailable", f"TensorRT backend requested but {why}")
        return "tensorrt"
    if requested != "auto":
        raise EngineBuildError("backend_unavailable", f"unknown backend {requested!r} (auto, ort, tensorrt)")
    return "tensorrt" if ok else "ort"


__all__ = ["BACKENDS", "Engine", "select_backend"]
