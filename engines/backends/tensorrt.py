"""TensorRT 10 on the GPU (Jetson Orin with JetPack 6, or an x86 PC with an NVIDIA GPU): the ``tensorrt``
backend plugin (:class:`TrtPlugin`) and its engine.

Real code against the TensorRT 10 Python API (``tensorrt>=10,<11``: TensorRT 11 removes
``BuilderFlag.FP16`` and ``platform_has_fast_fp16``; JetPack 6 ships 10.3). ``tensorrt`` and ``pycuda`` are
imported lazily, only when this backend is chosen, so CPU-only boxes never need them. Nothing here is
faked: where TensorRT is missing, :func:`available` says so and the ``auto`` choice falls back to ONNX
Runtime.

Build: parse ONNX -> FP16 when the GPU has fast FP16 (or when asked) -> one optimisation profile over the
dynamic batch -> workspace memory pool limit (Jetson "GPU" memory is system RAM) -> timing cache loaded and
saved between builds -> ``build_serialized_network``. Run: ``deserialize_cuda_engine``, one execution
context, pinned host buffers and device buffers sized for ``max_batch``, one CUDA stream, named tensors,
``set_input_shape`` + ``set_tensor_address`` + ``execute_async_v3``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from engines.backends.base import BackendPlugin, BuildContext, Engine, KeyFields, PluginConfig
from engines.backends.registry import register
from engines.errors import EngineBuildError

_lock = threading.Lock()


def available() -> tuple[bool, str]:
    """(True, "") when TensorRT 10, pycuda and at least one CUDA GPU are present; else (False, why)."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or a broken CUDA install raising OSError
        return False, f"tensorrt not importable ({exc.__class__.__name__}: {exc})"
    major = int(trt.__version__.split(".")[0])
    if major != 10:
        return False, f"tensorrt {trt.__version__} is not 10.x (this backend targets the TensorRT 10 API)"
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() < 1:
            return False, "no CUDA device"
    except Exception as exc:
        return False, f"pycuda/CUDA unavailable ({exc.__class__.__name__}: {exc})"
    return True, ""


def trt_version() -> str:
    """The installed TensorRT version (part of the cache key: a plan only runs on the TensorRT that built it)."""
    import tensorrt as trt

    return trt.__version__


def gpu_fingerprint(device: int = 0) -> dict[str, str]:
    """GPU name and compute capability (plus the L4T release on a Jetson): a plan only runs where built."""
    import pycuda.driver as cuda

    cuda.init()
    dev = cuda.Device(device)
    major, minor = dev.compute_capability()
    fp = {"gpu": dev.name(), "compute_capability": f"{major}.{minor}"}
    tegra = Path("/etc/nv_tegra_release")
    if tegra.exists():
        fp["l4t"] = tegra.read_text(errors="replace").splitlines()[0][:80]
    return fp


class _Context:
    """The device's primary CUDA context, pushed around each use (safe from any thread, no pycuda.autoinit)."""

    def __init__(self, device: int = 0):
        import pycuda.driver as cuda

        cuda.init()
        self._ctx = cuda.Device(device).retain_primary_context()

    def __enter__(self):
        self._ctx.push()
        return self

    def __exit__(self, *exc):
        import pycuda.driver as cuda

        cuda.Context.pop()

    def detach(self) -> None:
        self._ctx.detach()


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    *,
    precision: str = "auto",
    workspace_mib: int = 1024,
    max_batch: int = 8,
    opt_batch: int = 1,
    timing_cache_path: Path | None = None,
    optimisation_level: int = 3,
    progress: Callable[[str, int, int], None] | None = None,
    bundle: str = "?",
) -> str:
    """Build a serialised TensorRT plan; returns the precision used ("fp16" or "fp32")."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(
            "model_load_failed", f"TensorRT cannot parse the ONNX model: {errors[:800]}", bundle=bundle
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    config.builder_optimization_level = optimisation_level
    fp16 = precision == "fp16" or (precision == "auto" and builder.platform_has_fast_fp16)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if any(d < 0 for d in shape[1:]):
            raise EngineBuildError(
                "build_failed", f"input {tensor.name} has dynamic non-batch dims {shape}", bundle=bundle
            )
        if shape[0] < 0:
            rest = tuple(shape[1:])
            opt = max(1, min(opt_batch, max_batch))
            profile.set_shape(tensor.name, (1, *rest), (opt, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)
    old = timing_cache_path.read_bytes() if timing_cache_path and timing_cache_path.exists() else b""
    cache = config.create_timing_cache(old)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        cache = config.create_timing_cache(b"")  # a stale/foreign cache is dropped, never fatal
        config.set_timing_cache(cache, ignore_mismatch=False)
    if progress is not None and hasattr(trt, "IProgressMonitor"):
        config.progress_monitor = _Progress(progress)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError("build_failed", "TensorRT build_serialized_network returned nothing", bundle=bundle)
    plan_path.write_bytes(bytes(plan))
    if timing_cache_path is not None:
        timing_cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return "fp16" if fp16 else "fp32"


def _progress_base():
    import tensorrt as trt

    return trt.IProgressMonitor


class _Progress:  # becomes a trt.IProgressMonitor subclass on first use (tensorrt imported lazily)
    def __new__(cls, callback):
        base = _progress_base()

        class Monitor(base):  # type: ignore[misc, valid-type]
            def __init__(self, cb):
                base.__init__(self)
                self._cb = cb
                self._phases: dict[str, int] = {}

            def phase_start(self, phase_name, parent_phase, num_steps):
                self._phases[phase_name] = num_steps
                self._cb(phase_name, 0, num_steps)

            def step_complete(self, phase_name, step):
                self._cb(phase_name, step + 1, self._phases.get(phase_name, 0))
                return True  # False would cancel the build

            def phase_finish(self, phase_name):
                n = self._phases.pop(phase_name, 0)
                self._cb(phase_name, n, n)

        return Monitor(callback)


class TrtEngine(Engine):
    """A deserialised TensorRT plan with buffers sized for its max batch, on ``device``. Raises
    EngineBuildError("incompatible_plan") when this GPU/TensorRT cannot deserialise the plan."""

    backend_name = "tensorrt"

    def __init__(self, plan_path: Path, *, max_batch: int = 8, device: int = 0, bundle: str = "?"):
        import pycuda.driver as cuda
        import tensorrt as trt

        self.bundle = bundle
        self._ctx = _Context(device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        with _lock, self._ctx:
            runtime = trt.Runtime(self._logger)
            engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
            if engine is None:
                raise EngineBuildError(
                    "incompatible_plan", "TensorRT could not deserialise the plan (other GPU/TensorRT?)", bundle=bundle
                )
            self._runtime, self._engine = runtime, engine
            self._context = engine.create_execution_context()
            self._stream = cuda.Stream()
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            self.input_names = tuple(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
            self.output_names = tuple(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
            # the profile's max batch bounds every buffer; fixed-batch engines use their own batch
            first = self.input_names[0]
            shape = tuple(engine.get_tensor_shape(first))
            if shape[0] < 0:
                self.max_batch = int(engine.get_tensor_profile_shape(first, 0)[2][0])
            else:
                self.max_batch = int(shape[0])
            self._host: dict[str, np.ndarray] = {}
            self._device: dict[str, Any] = {}  # pycuda DeviceAllocation per tensor
            for n in names:
                full = tuple(self.max_batch if d < 0 else d for d in engine.get_tensor_shape(n))
                if any(d < 0 for d in full):
                    # output with a data-dependent shape: size it from the max input shape
                    self._context.set_input_shape(first, (self.max_batch, *shape[1:]))
                    full = tuple(self._context.get_tensor_shape(n))
                dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(n)))
                self._host[n] = cuda.pagelocked_empty(int(np.prod(full)), dtype)
                self._device[n] = cuda.mem_alloc(self._host[n].nbytes)
                self._context.set_tensor_address(n, int(self._device[n]))
        self.precision = "fp16" if any(self._host[n].dtype == np.float16 for n in names) else "engine"

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import pycuda.driver as cuda

        missing = set(self.input_names) - set(inputs)
        if missing:
            raise EngineBuildError("bad_input", f"missing inputs {sorted(missing)}", bundle=self.bundle)
        batch = next(iter(inputs.values())).shape[0]
        if batch > self.max_batch:
            raise EngineBuildError("bad_input", f"batch {batch} > max_batch {self.max_batch}", bundle=self.bundle)
        with self._ctx:
            for n in self.input_names:
                arr = np.ascontiguousarray(inputs[n], dtype=self._host[n].dtype)
                self._context.set_input_shape(n, arr.shape)
                view = self._host[n][: arr.size]
                view[:] = arr.ravel()
                cuda.memcpy_htod_async(self._device[n], view, self._stream)
            if not self._context.execute_async_v3(self._stream.handle):
                raise EngineBuildError("bad_input", "execute_async_v3 failed", bundle=self.bundle)
            shapes = {n: tuple(self._context.get_tensor_shape(n)) for n in self.output_names}
            for n in self.output_names:
                size = int(np.prod(shapes[n]))
                cuda.memcpy_dtoh_async(self._host[n][:size], self._device[n], self._stream)
            self._stream.synchronize()
            return {
                n: self._host[n][: int(np.prod(shapes[n]))].reshape(shapes[n]).astype(np.float32, copy=True)
                for n in self.output_names
            }

    def close(self) -> None:
        if getattr(self, "_engine", None) is None:
            return
        with self._ctx:
            for buf in self._device.values():
                buf.free()  # type: ignore[attr-defined]
            self._device.clear()
            self._context = None
            self._engine = None
            self._runtime = None
        self._ctx.detach()


class TrtConfig(PluginConfig):
    """Options of the ``tensorrt`` backend (``[engines.plugins.tensorrt]``; ``engines.trt_workspace_mib``
    still works)."""

    workspace_mib: int = Field(default=1024, ge=64, description="builder workspace memory pool limit")


@register
class TrtPlugin(BackendPlugin):
    """TensorRT 10 on an NVIDIA GPU: preferred by ``auto`` wherever it can run. The artefact is a
    serialised plan, valid only for this TensorRT version and this GPU (and L4T release on a Jetson).
    Builds and runs on CUDA device 0 (one GPU per box)."""

    type_key = "tensorrt"
    preference = 10
    Config = TrtConfig
    config: TrtConfig

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return available()

    def key_fields(self) -> KeyFields:
        p = self.profile
        return KeyFields(
            trt_version(),
            gpu_fingerprint(),
            p.precision,
            {"max_batch": p.max_batch, "opt_batch": p.opt_batch, "workspace_mib": self.config.workspace_mib},
        )

    def build(self, onnx_path: Path, out_path: Path, ctx: BuildContext) -> str:
        p = self.profile
        return build_plan(
            onnx_path,
            out_path,
            precision=p.precision,
            workspace_mib=self.config.workspace_mib,
            max_batch=p.max_batch,
            opt_batch=p.opt_batch,
            timing_cache_path=ctx.state_dir / "trt-timing.cache" if ctx.state_dir else None,
            progress=ctx.progress,
            bundle=ctx.bundle,
        )

    def load(self, artefact: Path, ctx: BuildContext) -> Engine:
        return TrtEngine(artefact, max_batch=self.profile.max_batch, bundle=ctx.bundle)
