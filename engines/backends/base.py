"""The one interface every inference backend implements.

Why: the pipeline must not care whether a model runs on TensorRT or ONNX Runtime. An engine takes named
float arrays (batch first) and returns named arrays; that is all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Engine(ABC):
    """A compiled, ready-to-run model. ``infer`` is thread-compatible, not thread-safe: one caller at a time."""

    backend_name: str = "?"
    max_batch: int = 1
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    precision: str = "fp32"

    @abstractmethod
    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch. Inputs: name -> array (N, ...); outputs: name -> array (N, ...), float32."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release native resources (GPU memory, sessions)."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
