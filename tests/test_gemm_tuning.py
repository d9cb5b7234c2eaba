"""The GEMM tuning file: keyed by what it depends on, written only after a good load, never trusted twice
after a failure, and out of the way of a host's own TM_GEMM_* variables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from legal_eagle import metrics
from legal_eagle.gemm_tuning import tuning_for_load, tuning_key

OPTIONS = {"model_format": "awq", "session_len": 8192, "max_batch_size": 8, "cache_max_entry_count": 0.5,
           "quant_policy": 8}
GPU, VERSION = "NVIDIA H100 80GB HBM3 sm90", "0.18.0"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "awq"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 4096, "num_hidden_layers": 32}))
    return folder


def load(folder: Path | None, model_dir: Path, env: dict[str, str], *, writes: bool = True,
         options: dict[str, Any] | None = None, gpu: str | None = GPU) -> Any:
    """What TurbomindEngine.load does around lmdeploy.pipeline, with a stand-in TurboMind."""
    with tuning_for_load(folder, model_dir, options or OPTIONS, gpu=gpu, version=VERSION, environ=env) as tuning:
        seen = dict(env)
        if writes and "TM_GEMM_EXPORT" in env:
            Path(env["TM_GEMM_EXPORT"]).write_text("tuned records\n")
    return tuning, seen


def test_first_load_exports_then_later_loads_import(tmp_path: Path, model_dir: Path) -> None:
    env: dict[str, str] = {}
    first, seen = load(tmp_path / "gemm", model_dir, env)
    assert first.mode == "export" and first.written and first.describe() == "export"
    assert "TM_GEMM_IMPORT" not in seen and seen["TM_GEMM_EXPORT"].endswith(".part")
    assert first.path is not None and first.path.read_text() == "tuned records\n"
    assert json.loads(first.path.with_suffix(".json").read_text())["gpu"] == GPU
    assert env == {} and not list((tmp_path / "gemm").glob("*.part"))
    second, seen = load(tmp_path / "gemm", model_dir, env)
    assert second.mode == "import" and seen == {"TM_GEMM_IMPORT": str(first.path)} and env == {}


def test_the_key_follows_gpu_version_config_and_options_but_not_the_cache_share(model_dir: Path) -> None:
    key = tuning_key(model_dir, OPTIONS, GPU, VERSION)
    assert key == tuning_key(model_dir, {**OPTIONS, "cache_max_entry_count": 0.2}, GPU, VERSION)
    others = {tuning_key(model_dir, {**OPTIONS, "max_batch_size": 16}, GPU, VERSION),
              tuning_key(model_dir, {**OPTIONS, "model_format": "hf"}, GPU, VERSION),
              tuning_key(model_dir, OPTIONS, "NVIDIA A10 sm86", VERSION),
              tuning_key(model_dir, OPTIONS, GPU, "0.19.0")}
    (model_dir / "config.json").write_text(json.dumps({"hidden_size": 2048, "num_hidden_layers": 32}))
    others.add(tuning_key(model_dir, OPTIONS, GPU, VERSION))
    assert key not in others and len(others) == 5


def test_a_failed_export_leaves_no_file(tmp_path: Path, model_dir: Path) -> None:
    env: dict[str, str] = {}
    gemm = tmp_path / "gemm"
    with pytest.raises(RuntimeError), tuning_for_load(gemm, model_dir, OPTIONS, gpu=GPU, version=VERSION,
                                                      environ=env):
        Path(env["TM_GEMM_EXPORT"]).write_text("half")  # TurboMind wrote, then the load failed
        raise RuntimeError("out of memory")
    assert env == {} and list(gemm.iterdir()) == []
    nothing, _ = load(gemm, model_dir, env, writes=False)  # TurboMind wrote nothing (nothing to tune)
    assert nothing.mode == "export" and not nothing.written and nothing.describe() == "export (no file)"
    assert list(gemm.iterdir()) == []


def test_a_load_that_fails_while_reading_the_file_deletes_it(tmp_path: Path, model_dir: Path) -> None:
    env: dict[str, str] = {}
    first, _ = load(tmp_path, model_dir, env)
    with pytest.raises(SystemExit), tuning_for_load(tmp_path, model_dir, OPTIONS, gpu=GPU, version=VERSION,
                                                    environ=env) as tuning:
        assert tuning.mode == "import"
        raise SystemExit(1)
    assert first.path is not None and not first.path.exists() and env == {}
    again, _ = load(tmp_path, model_dir, env)
    assert again.mode == "export" and again.written


@pytest.mark.parametrize("variable", ["TM_GEMM_IMPORT", "TM_GEMM_EXPORT", "TM_GEMM_TUNE"])
def test_the_hosts_own_variables_turn_it_off(tmp_path: Path, model_dir: Path, variable: str) -> None:
    env = {variable: "/host/choice"}
    tuning, seen = load(tmp_path / "gemm", model_dir, env, writes=False)
    assert tuning.mode == "off" and tuning.path is None and seen == env == {variable: "/host/choice"}
    assert not (tmp_path / "gemm").exists()


def test_off_without_a_folder_or_a_gpu_identity(tmp_path: Path, model_dir: Path, monkeypatch: Any) -> None:
    env: dict[str, str] = {}
    assert load(None, model_dir, env)[0].mode == "off"
    monkeypatch.setattr(metrics, "gpu_model", lambda index=0: None)  # no NVML: no GPU to key the file by
    assert load(tmp_path, model_dir, env, gpu=None)[0].mode == "off" and list(tmp_path.iterdir()) == [model_dir]
    monkeypatch.setattr(metrics, "gpu_model", lambda index=0: "NVIDIA A10 sm86")
    assert load(tmp_path / "gemm", model_dir, env, gpu=None)[0].mode == "export"


def test_gpu_model_reads_name_and_compute_capability(monkeypatch: Any) -> None:
    class Nvml:
        @staticmethod
        def nvmlDeviceGetHandleByIndex(index: int) -> int:  # noqa: N802 - pynvml's names
            return index

        @staticmethod
        def nvmlDeviceGetName(handle: int) -> bytes:  # noqa: N802
            return b"NVIDIA A10"

        @staticmethod
        def nvmlDeviceGetCudaComputeCapability(handle: int) -> tuple[int, int]:  # noqa: N802
            return 8, 6

    monkeypatch.setattr(metrics, "_nvml", lambda: Nvml)
    assert metrics.gpu_model(0) == "NVIDIA A10 sm86"
    monkeypatch.setattr(metrics, "_nvml", lambda: None)
    assert metrics.gpu_model(0) is None
