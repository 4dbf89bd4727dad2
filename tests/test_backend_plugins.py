"""Backend plugins: registry lookup and selection, per-plugin options and cache keys, and a second real CPU
plugin registered only here, which the runtime compiles, caches and golden-checks without knowing it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from pydantic import Field, ValidationError

from appliance.core.config import ConfigError, EnginesConfig, load_settings
from appliance.models.active import engine_options
from engines import runtime
from engines.backends import registry, select_backend
from engines.backends.base import BackendPlugin, BuildContext, Engine, KeyFields, PluginConfig, Profile
from engines.backends.ort import OrtConfig, OrtEngine, OrtPlugin, ort_version
from engines.backends.tensorrt import TrtConfig, TrtPlugin
from engines.bundle import verify_dir
from engines.cache import EngineCache, cpu_fingerprint
from engines.errors import EngineBuildError
from engines.registry import Registry
from testsupport.bundles import SIZE, make_bundle, new_key, trust_for

ORT = runtime.EngineOptions(backend="ort", plugins={"ort": {"intra_op_threads": 1}})


class LeanConfig(PluginConfig):
    threads: int = Field(default=1, ge=1)


class LeanOrtPlugin(BackendPlugin):
    """A second CPU backend, real: no offline compile (the artefact is the bundle's ONNX as is), ORT's
    optimiser runs at every load, and idle threads sleep instead of spinning."""

    type_key = "ort-lean"
    preference = 500  # behind ort: auto never picks it unless a test lowers this
    Config = LeanConfig
    config: LeanConfig

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return OrtPlugin.available()

    def key_fields(self) -> KeyFields:
        return KeyFields(ort_version(), cpu_fingerprint(), "fp32", {"threads": self.config.threads})

    def build(self, onnx_path: Path, out_path: Path, ctx: BuildContext) -> str:
        shutil.copyfile(onnx_path, out_path)
        return "fp32"

    def load(self, artefact: Path, ctx: BuildContext) -> Engine:
        eng = OrtEngine(
            artefact,
            intra_op_threads=self.config.threads,
            inter_op_threads=1,
            max_batch=self.profile.max_batch,
            optimised=False,
            allow_spinning=False,
            bundle=ctx.bundle,
        )
        eng.backend_name = self.type_key
        return eng


@pytest.fixture
def setup(tmp_path):
    key = new_key()
    return key, trust_for(key), tmp_path / "models"


def test_registry_lists_and_looks_up_the_shipped_plugins() -> None:
    names = registry.names()
    assert names.index("tensorrt") < names.index("ort"), "auto prefers TensorRT where it can run"
    assert registry.plugin_class("ort") is OrtPlugin and registry.plugin_class("tensorrt") is TrtPlugin
    assert OrtPlugin.Config is OrtConfig and TrtPlugin.Config is TrtConfig
    avail = registry.availability()
    assert avail["ort"] == (True, "")
    ok, why = avail["tensorrt"]
    assert ok or why, "an unavailable backend always says why"
    assert registry.select("auto") is (TrtPlugin if ok else OrtPlugin)
    assert select_backend("auto") == ("tensorrt" if ok else "ort")


def test_unknown_backend_is_an_error_naming_the_choices(setup, tmp_path) -> None:
    with pytest.raises(EngineBuildError) as ei:
        registry.plugin_class("cuda")
    assert ei.value.reason == "unknown_backend" and "auto, tensorrt, ort" in str(ei.value)
    key, trust, models = setup
    runtime.install_bundle(models, make_bundle(tmp_path, key), trust, ORT)
    with pytest.raises(EngineBuildError) as ei:
        runtime.compile_engine(models, "tiny", runtime.EngineOptions(backend="cuda"), trust=trust)
    assert ei.value.reason == "unknown_backend"
    with pytest.raises(ValueError, match="type_key"):
        registry.register(type("NoKey", (LeanOrtPlugin,), {"type_key": "auto"}))
    with pytest.raises(ValueError, match="already registered"):
        registry.register(type("Clash", (LeanOrtPlugin,), {"type_key": "ort"}))


def test_unavailable_named_backend_says_why() -> None:
    ok, why = TrtPlugin.available()
    if ok:
        pytest.skip("TensorRT can run here: nothing unavailable to name")
    with pytest.raises(EngineBuildError) as ei:
        registry.select("tensorrt")
    assert ei.value.reason == "backend_unavailable" and why in str(ei.value)


def test_plugin_options_are_validated_by_the_plugin(setup, tmp_path) -> None:
    with pytest.raises(EngineBuildError) as ei:
        registry.create("ort", {"ort": {"intra_op_thread": 2}}, Profile())  # typo
    assert ei.value.reason == "bad_backend_options" and "intra_op_thread" in str(ei.value)
    with pytest.raises(EngineBuildError):
        registry.configure("tensorrt", {"workspace_mib": 8})  # below the 64 MiB floor, checked on any box
    plugin = registry.create("ort", {"ort": {"intra_op_threads": 3}, "tensorrt": {"workspace_mib": 9}}, Profile())
    assert isinstance(plugin, OrtPlugin) and plugin.config.intra_op_threads == 3


def test_cache_keys_differ_per_plugin_and_per_option(setup, tmp_path) -> None:
    key, trust, models = setup
    runtime.install_bundle(models, make_bundle(tmp_path, key), trust, ORT)
    verified = verify_dir(Registry(models, trust).version_dir("tiny"), trust)
    profile = Profile()
    ort1 = runtime._key(verified, OrtPlugin(OrtConfig(intra_op_threads=1), profile))
    ort2 = runtime._key(verified, OrtPlugin(OrtConfig(intra_op_threads=2), profile))
    sleepy = runtime._key(verified, OrtPlugin(OrtConfig(intra_op_threads=1, allow_spinning=False), profile))
    lean = runtime._key(verified, LeanOrtPlugin(LeanConfig(threads=1), profile))
    assert ort1.backend == "ort" and lean.backend == "ort-lean"
    assert len({ort1.digest(), ort2.digest(), lean.digest()}) == 3
    assert sleepy.digest() == ort1.digest(), "a run-time-only option does not invalidate the compiled model"
    if TrtPlugin.available()[0]:
        trt = runtime._key(verified, TrtPlugin(TrtConfig(), profile))
        assert trt.backend == "tensorrt" and trt.digest() != ort1.digest() and "compute_capability" in trt.hardware


def test_a_plugin_registered_in_a_test_runs_through_the_unchanged_runtime(setup, tmp_path) -> None:
    key, trust, models = setup
    opts = runtime.EngineOptions(backend="ort-lean", max_batch=4, plugins={"ort-lean": {"threads": 2}})
    with registry.registered(LeanOrtPlugin):
        assert "ort-lean" in registry.names()
        runtime.install_bundle(models, make_bundle(tmp_path, key), trust, opts)  # build + golden check + activate
        res = runtime.compile_engine(models, "tiny", opts, trust=trust)
        assert res.backend == "ort-lean" and res.cache_hit and res.golden.passed and res.precision == "fp32"
        assert res.engine.backend_name == "ort-lean" and res.engine.max_batch == 4
        onnx = Registry(models, trust).version_dir("tiny") / "model.onnx"
        assert res.artefact.read_bytes() == onnx.read_bytes(), "the lean plugin's own build wrote the artefact"
        out = res.engine.infer({"image": np.ones((2, 1, SIZE, SIZE), np.float32)})
        np.testing.assert_allclose(out["scores"][:, 0], 1 / (1 + np.exp(-1.0)), rtol=1e-5)
        res.engine.close()
        # the shipped ort plugin keeps its own entry next to it
        res_ort = runtime.compile_engine(models, "tiny", ORT, trust=trust)
        assert res_ort.backend == "ort" and not res_ort.cache_hit and res_ort.artefact != res.artefact
        res_ort.engine.close()
        entries = EngineCache(models / "cache").entries()
        assert sorted(e["key_fields"]["backend"] for e in entries) == ["ort", "ort-lean"]
        # the appliance config accepts it with its own options table, no change to config.py
        cfg = EnginesConfig(backend="ort-lean", plugins={"ort-lean": {"threads": 3}})
        assert cfg.plugin_options()["ort-lean"] == {"threads": 3}
        with pytest.raises(ValidationError, match="threads"):
            EnginesConfig(plugins={"ort-lean": {"threads": 0}})
        # preference decides auto
        LeanOrtPlugin.preference = 1
        try:
            assert registry.select("auto") is LeanOrtPlugin
        finally:
            LeanOrtPlugin.preference = 500
    assert "ort-lean" not in registry.names()
    with pytest.raises(EngineBuildError) as ei:
        runtime.compile_engine(models, "tiny", opts, trust=trust)
    assert ei.value.reason == "unknown_backend"


def test_runtime_names_no_backend() -> None:
    source = Path(runtime.__file__).read_text()
    for word in ('"ort"', '"tensorrt"', "onnxruntime", "import tensorrt", "backends.ort", "backends.tensorrt"):
        assert word not in source, word


def test_legacy_flat_keys_still_configure_the_shipped_plugins() -> None:
    cfg = EnginesConfig(ort_intra_op_threads=3, ort_inter_op_threads=2, trt_workspace_mib=512)
    opts = cfg.plugin_options()
    assert opts["ort"] == {"intra_op_threads": 3, "inter_op_threads": 2} and opts["tensorrt"] == {"workspace_mib": 512}
    cfg = EnginesConfig(ort_intra_op_threads=3, plugins={"ort": {"intra_op_threads": 5, "allow_spinning": False}})
    assert cfg.plugin_options()["ort"] == {"intra_op_threads": 5, "inter_op_threads": 1, "allow_spinning": False}
    assert registry.create("ort", cfg.plugin_options(), Profile()).config.allow_spinning is False
    with pytest.raises(ValidationError, match="unknown_backend"):
        EnginesConfig(plugins={"cuda": {}})
    with pytest.raises(ValidationError, match="backend"):
        EnginesConfig(backend="cuda")


def test_tensorrt_plugin_real() -> None:
    ok, why = TrtPlugin.available()
    if not ok:
        pytest.skip(f"TensorRT plugin needs TensorRT 10 + pycuda + a CUDA GPU, absent here: {why}")
    fields = TrtPlugin(TrtConfig(workspace_mib=256), Profile(precision="fp16", max_batch=4)).key_fields()
    assert fields.backend_version.startswith("10.") and fields.precision == "fp16"
    assert fields.profile == {"max_batch": 4, "opt_batch": 1, "workspace_mib": 256}


def test_config_file_problem_names_the_plugin_option(clean_env, tmp_path: Path) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text("[engines]\nbackend = 'ort'\n[engines.plugins.ort]\nintra_op_thread = 2\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    (problem,) = err.value.problems
    assert problem.startswith("engines.plugins") and "'ort': intra_op_thread: Extra inputs" in problem
    cfg.write_text("[engines]\nort_intra_op_threads = 2\n[engines.plugins.tensorrt]\nworkspace_mib = 2048\n")
    opts = engine_options(load_settings(cfg))
    assert opts.plugins["ort"]["intra_op_threads"] == 2 and opts.plugins["tensorrt"] == {"workspace_mib": 2048}
