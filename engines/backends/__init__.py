"""Inference backends as plugins behind one interface (:mod:`engines.backends.base`), picked by type key.

Each backend is one module here with one :class:`~engines.backends.base.BackendPlugin` subclass registered
in :mod:`engines.backends.registry` (``ort``: ONNX Runtime on the CPU; ``tensorrt``: TensorRT 10 on the
GPU). ``auto`` = the available plugin with the lowest ``preference`` (TensorRT where it can run, else ONNX
Runtime).
"""

from __future__ import annotations

from engines.backends.base import BackendPlugin, Engine
from engines.backends.registry import AUTO, names, select


def select_backend(requested: str = AUTO) -> str:
    """Resolve ``auto`` or a type key to the type key of a backend that can run here.

    Raises EngineBuildError: unknown_backend, or backend_unavailable for a named backend that cannot run.
    """
    return select(requested).type_key


__all__ = ["AUTO", "BackendPlugin", "Engine", "names", "select", "select_backend"]
