"""The two interfaces every inference backend implements: a backend plugin and the engine it loads.

Why: the pipeline must not care whether a model runs on TensorRT or ONNX Runtime. An engine takes named
float arrays (batch first) and returns named arrays; that is all. A plugin (one class per backend, in its
own module of this package, registered with :func:`engines.backends.registry.register`) says whether it
can run on this machine, what makes its compiled artefact valid (the cache key fields), how to compile a
bundle's ONNX for this machine and how to load the result as an :class:`Engine`. The runtime only talks
to these two interfaces (the shape of Frigate's detector plugins).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

Progress = Callable[[str, int, int], None]  # (phase, done, total)


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


class PluginConfig(BaseModel):
    """Base of every plugin's own options model: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Profile:
    """The options every backend shares: requested precision (auto | fp32 | fp16) and the batch range."""

    precision: str = "auto"
    max_batch: int = 8
    opt_batch: int = 1


@dataclass(frozen=True)
class KeyFields:
    """What, besides the bundle, makes a compiled artefact valid: see :class:`engines.cache.CacheKey`."""

    backend_version: str
    hardware: dict[str, str] = field(default_factory=dict)
    precision: str = "fp32"
    profile: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildContext:
    """Where a build runs: ``bundle`` ("id@version", for messages), ``state_dir`` (a directory the backend
    may keep files in across builds, e.g. TensorRT's timing cache) and an optional ``progress`` callback."""

    bundle: str = "?"
    state_dir: Path | None = None
    progress: Progress | None = None


class BackendPlugin(ABC):
    """One inference backend. Subclasses set ``type_key`` (the ``engines.backend`` value), ``preference``
    (``auto`` tries the lowest first) and ``Config`` (their :class:`PluginConfig`), and implement the rest.

    A plugin instance is cheap and holds only its validated config and the shared :class:`Profile`; the
    backend's own library is imported lazily, in the methods, so a box without it still imports the module.
    """

    type_key: ClassVar[str]
    preference: ClassVar[int] = 100
    Config: ClassVar[type[PluginConfig]] = PluginConfig

    def __init__(self, config: PluginConfig | None = None, profile: Profile | None = None):
        self.config = config if config is not None else self.Config()
        self.profile = profile if profile is not None else Profile()

    @classmethod
    @abstractmethod
    def available(cls) -> tuple[bool, str]:
        """(True, "") when this backend can run on this machine; else (False, a human reason)."""

    @abstractmethod
    def key_fields(self) -> KeyFields:
        """The software/hardware fingerprint and options an artefact built by :meth:`build` depends on."""

    @abstractmethod
    def build(self, onnx_path: Path, out_path: Path, ctx: BuildContext) -> str:
        """Compile ``onnx_path`` for this machine into the single file ``out_path``; returns the precision
        actually used ("fp32", "fp16"). Raises :class:`engines.errors.EngineBuildError` (model_load_failed,
        build_failed)."""

    @abstractmethod
    def load(self, artefact: Path, ctx: BuildContext) -> Engine:
        """Load an artefact :meth:`build` wrote as a ready :class:`Engine`. Raises
        :class:`engines.errors.EngineBuildError` when it cannot (e.g. a plan from another TensorRT)."""
