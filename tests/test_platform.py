"""Driver / CUDA / GPU-memory checks, with versions injected (no GPU needed)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from legal_eagle.platform import (
    GB,
    STARTUP_BYTES,
    Gpu,
    check_platform,
    collect_platform,
    cuda_major_minor,
    driver_requirement,
    gpu_fit_report,
    memory_need,
    parse_version,
    read_proc_driver_version,
    visible_indices,
)

A10 = Gpu(0, "NVIDIA A10", 24 * GB, 23 * GB)


def report(driver: str | None, torch_cuda: str | None = "12.8", engine_cuda: str | None = "12.8.90",
           gpus: tuple[Gpu, ...] = (A10,)):
    return check_platform(torch_version="2.10.0+cu128" if torch_cuda else "2.10.0+cpu", torch_cuda=torch_cuda,
                          engine_cuda=engine_cuda, driver_version=driver, gpus=gpus)


def test_version_helpers() -> None:
    assert parse_version("570.86.15") == (570, 86, 15) and parse_version("535.104.05 ") == (535, 104, 5)
    assert parse_version("") is None and parse_version("n/a") is None
    assert cuda_major_minor("12.8.90") == "12.8" and cuda_major_minor("13") == "13.0"
    assert driver_requirement("12.8") == ("525.60.13", "570.26")
    assert driver_requirement("13.0.2") == ("580", "580.65.06")


def test_current_driver_for_cuda_12_8_is_clean() -> None:
    rep = report("570.195.03")
    assert rep.ok and rep.findings == ()
    assert rep.as_dict()["gpus"][0]["name"] == "NVIDIA A10"


def test_driver_too_old_for_cuda_12_is_an_error_with_fix() -> None:
    rep = report("470.256.02")
    assert not rep.ok
    codes = [f.code for f in rep.findings]
    assert codes == ["driver_too_old_pytorch", "driver_too_old_turbomind"]
    first = rep.findings[0]
    assert "太旧" in first.zh and "525.60.13" in first.zh and "470.256.02" in first.zh
    assert "too old" in first.en and "2.10.0+cu128" in first.en and "570.26" in first.en


def test_minor_version_compatibility_is_only_a_note() -> None:
    rep = report("535.183.01")  # common on hosted A10s: runs CUDA 12.8 through minor-version compatibility
    assert rep.ok
    assert {f.code for f in rep.findings} == {"driver_minor_compat_pytorch", "driver_minor_compat_turbomind"}
    assert all(f.level == "info" and "570.26" in f.en for f in rep.findings)


def test_cuda_13_torch_needs_580() -> None:
    rep = check_platform(torch_version="2.12.1+cu130", torch_cuda="13.0", engine_cuda="12.8.90",
                         driver_version="570.86.15", gpus=(A10,))
    assert not rep.ok and [f.code for f in rep.findings] == ["driver_too_old_pytorch"]
    assert "580" in rep.findings[0].zh and "CUDA 13.0" in rep.findings[0].en
    assert check_platform(torch_version="2.12.1+cu130", torch_cuda="13.0", engine_cuda=None,
                          driver_version="580.95.05", gpus=(A10,)).findings == ()


def test_no_gpu_and_cpu_torch() -> None:
    rep = report(None, gpus=())
    assert rep.ok and [f.code for f in rep.findings] == ["no_gpu"]
    assert "CPU" in rep.findings[0].zh and "GPU" in rep.findings[0].en
    remote = check_platform(torch_version="2.10.0+cu128", torch_cuda="12.8", engine_cuda="12.8.90",
                            driver_version=None, gpus=(), local_engine=False)
    assert [(f.level, f.code) for f in remote.findings] == [("info", "no_gpu_remote")]
    cpu_torch = report("570.195.03", torch_cuda=None)
    assert [f.code for f in cpu_torch.findings] == ["torch_cpu_build"]


def test_markdown_and_log(caplog: pytest.LogCaptureFixture) -> None:
    rep = report("470.82.01")
    text = rep.markdown()
    assert "NVIDIA 驱动 470.82.01" in text and "NVIDIA A10" in text and text.count("🔴") == 2
    with caplog.at_level(logging.INFO, logger="legal_eagle.platform"):
        rep.log()
    assert any(r.levelno == logging.ERROR and "too old" in r.getMessage() for r in caplog.records)


def test_gpu_fit_report_wording() -> None:
    need = memory_need("awq")
    assert 7.5 * GB < need < 8.0 * GB  # 6.5 GiB-ish start-up + 1 GiB KV minimum
    fits = gpu_fit_report(23 * GB, need, startup_bytes=STARTUP_BYTES["awq"])
    assert fits.level == "info" and "23.0 GB" in fits.zh and "token" in fits.zh
    assert "123,476 个 token" in fits.zh  # (23 GB - 6,500 MiB) / 128 KiB per token on an A10
    small = gpu_fit_report(6 * GB, need)
    assert small.level == "error" and "显存不够" in small.zh and "--tp 2" in small.zh and "6.0 GB" in small.en
    assert memory_need("hf") > 16 * GB and memory_need("hf", tp=2) < memory_need("hf")
    with pytest.raises(ValueError, match="model_format"):
        memory_need("gguf")
    with pytest.raises(ValueError, match="tp"):
        memory_need("awq", tp=0)


def test_proc_driver_file_and_visible_devices(tmp_path: Path) -> None:
    proc = tmp_path / "version"
    proc.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.86.15  Fri Jan 24 2025\n"
                    "GCC version:  gcc version 12.2.0\n")
    assert read_proc_driver_version(proc) == "570.86.15"
    open_kernel = tmp_path / "open"
    open_kernel.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build\n")
    assert read_proc_driver_version(open_kernel) == "580.95.05"
    assert read_proc_driver_version(tmp_path / "missing") is None
    assert visible_indices(4, None) == [0, 1, 2, 3]
    assert visible_indices(4, "2,3") == [2, 3] and visible_indices(4, "") == []
    assert visible_indices(4, "1,-1,2") == [1] and visible_indices(2, "GPU-abc") == [0, 1]


def test_collect_platform_on_this_machine() -> None:
    """Runs anywhere: here (no GPU) it must say so instead of failing."""
    rep = collect_platform()
    assert rep.torch_cuda == "12.8" and rep.engine_cuda is not None and rep.engine_cuda.startswith("12.")
    if not rep.gpus:
        assert "no_gpu" in {f.code for f in rep.findings}
