"""ONNX Runtime on the CPU: the ``ort`` backend plugin (:class:`OrtPlugin`) and its engine.

The "compile" step runs ORT's graph optimiser once and saves the optimised model, so later loads skip
the optimisation pass (that artefact is what the engine cache keeps). It is specific to this CPU's
instruction set, which is why the cache key includes the ISA flags.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field

from engines.backends.base import BackendPlugin, BuildContext, Engine, KeyFields, PluginConfig
from engines.backends.registry import register
from engines.cache import cpu_fingerprint
from engines.errors import EngineBuildError


def ort_version() -> str:
    """The installed onnxruntime version (part of the cache key)."""
    import onnxruntime as ort

    return ort.__version__


def _session_options(intra_op_threads: int, inter_op_threads: int, allow_spinning: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not allow_spinning:  # idle worker threads sleep instead of spinning: kinder to a shared CPU
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if intra_op_threads:
        so.intra_op_num_threads = intra_op_threads
    if inter_op_threads:
        so.inter_op_num_threads = inter_op_threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return so


def compile_ort(
    onnx_path: Path, out_path: Path, *, intra_op_threads: int = 0, inter_op_threads: int = 1, bundle: str = "?"
) -> Path:
    """Optimise ``onnx_path`` for this CPU and save the result to ``out_path``."""
    import onnxruntime as ort

    so = _session_options(intra_op_threads, inter_op_threads)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(out_path)
    try:
        ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        raise EngineBuildError(
            "model_load_failed", f"ONNX Runtime cannot load the model: {str(exc)[:500]}", bundle=bundle
        ) from exc
    if not Path(out_path).is_file():
        raise EngineBuildError("build_failed", "ONNX Runtime wrote no optimised model", bundle=bundle)
    return Path(out_path)


class OrtEngine(Engine):
    """An ONNX Runtime CPU session over ``model_path``; ``optimised`` = the model is already the output of
    :func:`compile_ort` (no second optimisation pass). Raises EngineBuildError("model_load_failed")."""

    backend_name = "ort"

    def __init__(
        self,
        model_path: Path,
        *,
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
        max_batch: int = 8,
        optimised: bool = False,
        allow_spinning: bool = True,
        bundle: str = "?",
    ):
        import onnxruntime as ort

        so = _session_options(intra_op_threads, inter_op_threads, allow_spinning)
        # An already-optimised model needs no second pass (that is the point of compiling it).
        so.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_DISABLE_ALL if optimised else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        )
        try:
            self._session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise EngineBuildError(
                "model_load_failed",
                f"ONNX Runtime cannot load {Path(model_path).name}: {str(exc)[:500]}",
                bundle=bundle,
            ) from exc
        self.bundle = bundle
        self.input_names = tuple(i.name for i in self._session.get_inputs())
        self.output_names = tuple(o.name for o in self._session.get_outputs())
        batch = self._session.get_inputs()[0].shape[0]
        self.max_batch = batch if isinstance(batch, int) and batch > 0 else max_batch
        self._names = list(self.output_names)

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self._session.run(self._names, inputs)
        return dict(zip(self._names, outs, strict=True))

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]


class OrtConfig(PluginConfig):
    """Options of the ``ort`` backend (``[engines.plugins.ort]``; the flat ``engines.ort_*`` keys still work)."""

    intra_op_threads: int = Field(default=0, ge=0, description="0 = ONNX Runtime decides")
    inter_op_threads: int = Field(default=1, ge=0)
    allow_spinning: bool = Field(default=True, description="False: idle ORT threads sleep (kinder to a shared CPU)")


@register
class OrtPlugin(BackendPlugin):
    """ONNX Runtime on the CPU: runs everywhere, so ``auto``'s last resort. Always fp32; the compiled
    artefact is ORT's optimised model, valid for this onnxruntime version and this CPU's ISA."""

    type_key = "ort"
    preference = 100
    Config = OrtConfig
    config: OrtConfig

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except Exception as exc:  # ImportError, or a broken native library
            return False, f"onnxruntime not importable ({exc.__class__.__name__}: {exc})"
        if "CPUExecutionProvider" not in ort.get_available_providers():
            return False, "onnxruntime has no CPUExecutionProvider"
        return True, ""

    def key_fields(self) -> KeyFields:
        c = self.config  # allow_spinning is a run-time setting: the optimised model does not depend on it
        return KeyFields(
            ort_version(), cpu_fingerprint(), "fp32", {"intra": c.intra_op_threads, "inter": c.inter_op_threads}
        )

    def build(self, onnx_path: Path, out_path: Path, ctx: BuildContext) -> str:
        if ctx.progress:
            ctx.progress("optimise", 0, 1)
        c = self.config
        compile_ort(
            onnx_path,
            out_path,
            intra_op_threads=c.intra_op_threads,
            inter_op_threads=c.inter_op_threads,
            bundle=ctx.bundle,
        )
        if ctx.progress:
            ctx.progress("optimise", 1, 1)
        return "fp32"

    def load(self, artefact: Path, ctx: BuildContext) -> Engine:
        c = self.config
        return OrtEngine(
            artefact,
            intra_op_threads=c.intra_op_threads,
            inter_op_threads=c.inter_op_threads,
            max_batch=self.profile.max_batch,
            optimised=True,
            allow_spinning=c.allow_spinning,
            bundle=ctx.bundle,
        )
