"""Start-up checks of the machine: NVIDIA driver vs the CUDA builds we ship, GPUs, GPU memory.

Hosted GPUs (ModelScope xGPU, OpenXLab A10/A100) often run older drivers than the CUDA
build of the wheels we install, and then CUDA fails deep inside torch or TurboMind with a
cryptic message. ``collect_platform()`` reads the versions once at start-up (NVML, or
``/proc/driver/nvidia/version``) and ``check_platform`` (pure, tested with injected
versions) says plainly, in Chinese and English, what is wrong and how to fix it.

Driver minimums, Linux x86_64, from NVIDIA's CUDA Toolkit release notes and the CUDA
Compatibility guide (docs.nvidia.com/deploy/cuda-compatibility):

* minor-version compatibility: any CUDA 12.x build runs on driver >= 525.60.13 (with a
  limited feature set: no PTX JIT of newer PTX); any CUDA 13.x build needs >= 580.
* the driver each toolkit shipped with (full features): 12.8 GA >= 570.26,
  12.6 >= 560.28.03, 13.0 GA >= 580.65.06 (table ``TOOLKIT_DRIVER``).

Our pins: torch 2.10.0 is a CUDA 12.8 build, and TurboMind links the CUDA 12 runtime from
the ``nvidia-cuda-runtime-cu12`` wheel (12.8), so the app needs driver >= 525.60.13 and
runs fully on >= 570.26. (torch >= 2.11 from PyPI is a CUDA 13.0 build: driver >= 580.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

GB = 10**9
GIB = 2**30
MINOR_COMPAT_DRIVER: dict[int, str] = {11: "450.80.02", 12: "525.60.13", 13: "580"}
TOOLKIT_DRIVER: dict[str, str] = {
    "11.8": "520.61.05", "12.0": "525.60.13", "12.1": "530.30.02", "12.2": "535.54.03", "12.3": "545.23.06",
    "12.4": "550.54.14", "12.5": "555.42.02", "12.6": "560.28.03", "12.8": "570.26", "12.9": "575.51.03",
    "13.0": "580.65.06",
}
# Published LMDeploy start-up memory of InternLM2-chat-7B with the KV cache excluded (weights,
# activations, CUDA context); the KV cache takes a share of what is left.
STARTUP_BYTES: dict[str, int] = {"awq": 6_500 * 2**20, "hf": 16_258 * 2**20}
KV_BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2  # InternLM2-7B: layers x kv heads x head dim x (k, v) x fp16 = 128 KiB
MIN_KV_BYTES = 1 * GIB  # below this the app could hold only a few thousand tokens for all users together

Level = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class Finding:
    """One thing the operator should know, in both languages."""

    level: Level
    code: str
    zh: str
    en: str


@dataclass(frozen=True)
class Gpu:
    """One GPU as NVML sees it."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class PlatformReport:
    """Versions found and what they mean.

    Attributes:
        torch_version: e.g. ``2.10.0+cu128``, or None when torch is missing.
        torch_cuda: CUDA version torch was built for (``torch.version.cuda``), None for a CPU build.
        engine_cuda: CUDA runtime TurboMind links (``nvidia-cuda-runtime-cu12`` version), or None.
        driver_version: NVIDIA driver, e.g. ``570.86.15``, or None when none is found.
        gpus: the visible GPUs.
        findings: problems and notes, worst first.
    """

    torch_version: str | None
    torch_cuda: str | None
    engine_cuda: str | None
    driver_version: str | None
    gpus: tuple[Gpu, ...] = ()
    findings: tuple[Finding, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """True when nothing is at error level."""
        return not any(f.level == "error" for f in self.findings)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (health endpoint, exports)."""
        return {"ok": self.ok, "torch_version": self.torch_version, "torch_cuda": self.torch_cuda,
                "engine_cuda": self.engine_cuda, "driver_version": self.driver_version,
                "gpus": [asdict(g) for g in self.gpus], "findings": [asdict(f) for f in self.findings]}

    def markdown(self) -> str:
        """A short block for the status page (Chinese first, English below each line)."""
        gpus = "、".join(f"{g.name}（{g.total_bytes / GB:.0f} GB，空闲 {g.free_bytes / GB:.1f} GB）"
                        for g in self.gpus) or "无"
        lines = [f"**运行环境**：NVIDIA 驱动 {self.driver_version or '未检测到'} · "
                 f"PyTorch {self.torch_version or '未安装'}（CUDA {self.torch_cuda or 'CPU 版'}） · "
                 f"TurboMind CUDA {self.engine_cuda or '未知'} · GPU：{gpus}"]
        icons = {"error": "🔴", "warning": "🟡", "info": "ℹ️"}
        lines += [f"- {icons[f.level]} {f.zh}<br><small>{f.en}</small>" for f in self.findings]
        return "\n".join(lines)

    def log(self, logger: logging.Logger | None = None) -> None:
        """Write the report to the log: one line of versions, one line per finding (English)."""
        out = logger or log
        out.info("platform: driver %s, torch %s (CUDA %s), TurboMind CUDA %s, GPUs: %s", self.driver_version,
                 self.torch_version, self.torch_cuda, self.engine_cuda,
                 ", ".join(f"{g.index}:{g.name} {g.free_bytes / GB:.1f}/{g.total_bytes / GB:.1f} GB"
                           for g in self.gpus) or "none")
        for finding in self.findings:
            level = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO}[finding.level]
            out.log(level, "platform [%s]: %s", finding.code, finding.en)


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """``'570.86.15'`` → ``(570, 86, 15)``; None when there is no leading number."""
    if not text:
        return None
    match = re.match(r"\s*(\d+(?:\.\d+)*)", text)
    return tuple(int(p) for p in match.group(1).split(".")) if match else None


def cuda_major_minor(version: str | None) -> str | None:
    """``'12.8.90'`` → ``'12.8'``; None stays None."""
    parts = parse_version(version)
    if not parts:
        return None
    return f"{parts[0]}.{parts[1] if len(parts) > 1 else 0}"


def driver_requirement(cuda: str) -> tuple[str | None, str | None]:
    """(minimum driver with minor-version compatibility, driver the toolkit shipped with) for a CUDA version."""
    mm = cuda_major_minor(cuda)
    if mm is None:
        return None, None
    major = int(mm.split(".")[0])
    return MINOR_COMPAT_DRIVER.get(major), TOOLKIT_DRIVER.get(mm)


def check_platform(*, torch_version: str | None, torch_cuda: str | None, engine_cuda: str | None,
                   driver_version: str | None, gpus: Sequence[Gpu] = (), local_engine: bool = True) -> PlatformReport:
    """Judge injected versions (pure).

    Args:
        torch_version: ``torch.__version__`` or None.
        torch_cuda: ``torch.version.cuda`` (None for a CPU build).
        engine_cuda: CUDA runtime version TurboMind links, or None when unknown.
        driver_version: NVIDIA driver version, or None when no driver is found.
        gpus: the GPUs NVML lists (after ``CUDA_VISIBLE_DEVICES``).
        local_engine: False when the model runs elsewhere (``--backend remote``): then a
            missing GPU is only a note.

    Returns:
        The report; ``ok`` is False when CUDA cannot work with this driver.
    """
    findings: list[Finding] = []
    if (driver_version is None or not gpus) and not local_engine:
        findings.append(Finding("info", "no_gpu_remote", "本机没有 GPU：模型在远程服务上运行，本机不需要 GPU。",
                                "No GPU here: the model runs on the remote server, none is needed locally."))
    elif driver_version is None or not gpus:
        findings.append(Finding(
            "warning", "no_gpu",
            "未检测到可用的 NVIDIA GPU 或驱动：TurboMind 无法运行，应用将使用很慢的 CPU 引擎（transformers）。"
            "在托管平台上请选择 GPU 规格（如 A10 24 GB），并确认 nvidia-smi 能看到显卡。",
            "No usable NVIDIA GPU or driver found: TurboMind cannot run, the app falls back to the slow CPU "
            "engine (transformers). On a hosted platform pick a GPU flavour (e.g. A10 24 GB) and check that "
            "nvidia-smi lists the card."))
    if driver_version is not None:
        for label, cuda in (("PyTorch", torch_cuda), ("TurboMind", engine_cuda)):
            if cuda:
                findings += _driver_findings(label, cuda, driver_version, torch_version)
    if torch_version is not None and torch_cuda is None and gpus:
        findings.append(Finding(
            "warning", "torch_cpu_build",
            f"安装的 PyTorch {torch_version} 是 CPU 版本：TurboMind 不受影响，"
            "但 transformers 引擎和显存统计用不上 GPU。",
            f"PyTorch {torch_version} is a CPU-only build: TurboMind is unaffected, but the transformers "
            "engine and GPU memory readings cannot use the GPU."))
    order = {"error": 0, "warning": 1, "info": 2}
    findings.sort(key=lambda f: order[f.level])
    return PlatformReport(torch_version, torch_cuda, engine_cuda, driver_version, tuple(gpus), tuple(findings))


def _driver_findings(label: str, cuda: str, driver: str, torch_version: str | None) -> list[Finding]:
    """Findings for one CUDA build against the driver."""
    minimum, shipped = driver_requirement(cuda)
    have = parse_version(driver)
    mm = cuda_major_minor(cuda)
    if minimum is None or have is None:
        return [Finding("info", "driver_unknown_cuda",
                        f"无法判断驱动 {driver} 是否支持 {label} 的 CUDA {cuda}。",
                        f"Cannot tell whether driver {driver} supports {label}'s CUDA {cuda}.")]
    what = f"{label} {torch_version}" if label == "PyTorch" and torch_version else label
    if have < parse_version(minimum):  # type: ignore[operator]
        fix_zh = ("请把驱动升级到 ≥ " + (shipped or minimum) + "，或安装与驱动匹配的 torch（torch 2.10.0 是 CUDA 12.8 "
                  "版本，驱动 ≥ 525.60.13 即可运行；torch ≥ 2.11 的 PyPI 版本是 CUDA 13.0，需要驱动 ≥ 580）。")
        fix_en = (f"Upgrade the driver to >= {shipped or minimum}, or install a torch build that matches the driver "
                  "(torch 2.10.0 is a CUDA 12.8 build and runs on driver >= 525.60.13; PyPI torch >= 2.11 is a "
                  "CUDA 13.0 build and needs driver >= 580).")
        return [Finding("error", f"driver_too_old_{label.lower()}",
                        f"NVIDIA 驱动 {driver} 太旧：{what} 使用 CUDA {mm}，至少需要驱动 {minimum}。{fix_zh}",
                        f"NVIDIA driver {driver} is too old: {what} uses CUDA {mm}, which needs driver >= "
                        f"{minimum}. {fix_en}")]
    if shipped is not None and have < parse_version(shipped):  # type: ignore[operator]
        return [Finding("info", f"driver_minor_compat_{label.lower()}",
                        f"驱动 {driver} 低于 CUDA {mm} 的发布驱动 {shipped}：{label} 以 CUDA 小版本兼容模式运行"
                        "（一般没问题，部分新特性不可用）。",
                        f"Driver {driver} is older than CUDA {mm}'s release driver {shipped}: {label} runs under "
                        "CUDA minor-version compatibility (normally fine, a few newer features are unavailable).")]
    return []


def gpu_fit_report(free_bytes: int, need_bytes: int, *, what: str = "4-bit AWQ 7B 模型",
                   startup_bytes: int | None = None) -> Finding:
    """Whether a model fits the free GPU memory, in words for the start page.

    Args:
        free_bytes: free memory of the GPU (per GPU with ``--tp``).
        need_bytes: what loading needs, KV-cache minimum included (see ``memory_need``).
        what: the model in words (Chinese).
        startup_bytes: the part of ``need_bytes`` that is not KV cache; when given, the message
            says how many tokens of KV cache the rest holds.

    Returns:
        An ``info`` finding when it fits, an ``error`` one when not.
    """
    free_gb, need_gb = free_bytes / GB, need_bytes / GB
    if free_bytes >= need_bytes:
        extra_zh = extra_en = ""
        if startup_bytes is not None:
            tokens = max(free_bytes - startup_bytes, 0) // KV_BYTES_PER_TOKEN
            extra_zh = f"，其余可作 KV 缓存（最多约 {tokens:,} 个 token，所有用户共享）"
            extra_en = f"; the rest can hold about {tokens:,} tokens of KV cache shared by all users"
        return Finding("info", "gpu_fits", f"显卡空闲显存 {free_gb:.1f} GB，{what} 需要约 {need_gb:.1f} GB{extra_zh}。",
                       f"{free_gb:.1f} GB of GPU memory free; the model needs about {need_gb:.1f} GB{extra_en}.")
    return Finding(
        "error", "gpu_too_small",
        f"显存不够：显卡只有 {free_gb:.1f} GB 空闲，{what} 需要约 {need_gb:.1f} GB"
        "（权重 + 运行缓冲 + 最少的 KV 缓存）。"
        "请选择更大的显卡（4-bit 7B 约需 6.5 GB 以上，fp16 约需 16 GB 以上，A10 24 GB 足够），关闭占用显存的程序，"
        "改用 4-bit 模型（--model-format awq），或用 --tp 2 把模型分到两张卡上。",
        f"Not enough GPU memory: {free_gb:.1f} GB free, the model needs about {need_gb:.1f} GB (weights, "
        "buffers and a minimal KV cache). Use a bigger GPU (4-bit 7B needs about 6.5 GB and more, fp16 about "
        "16 GB and more; an A10 24 GB is enough), stop other GPU programs, use the 4-bit model "
        "(--model-format awq), or split the model over two GPUs with --tp 2.")


def memory_need(model_format: str, tp: int = 1, kv_bytes: int = MIN_KV_BYTES) -> int:
    """Bytes per GPU that InternLM2-7B needs in TurboMind: start-up memory split over ``tp`` plus KV cache.

    Raises:
        ValueError: unknown format or tp < 1.
    """
    if model_format not in STARTUP_BYTES:
        raise ValueError(f"model_format must be one of {sorted(STARTUP_BYTES)}, got {model_format!r}")
    if tp < 1:
        raise ValueError(f"tp must be at least 1, got {tp}")
    return STARTUP_BYTES[model_format] // tp + kv_bytes


def collect_platform(local_engine: bool = True) -> PlatformReport:
    """Read the versions on this machine and judge them (imports torch and NVML lazily).

    Args:
        local_engine: False with ``--backend remote`` (a missing GPU is then fine).

    Returns:
        The report; log it with ``report.log()`` and show ``report.markdown()`` on the status page.
    """
    torch_version = torch_cuda = None
    try:
        import torch

        torch_version, torch_cuda = str(torch.__version__), torch.version.cuda
    except ImportError:
        pass
    driver, gpus = _nvml_driver_and_gpus()
    if driver is None:
        driver = read_proc_driver_version()
    return check_platform(torch_version=torch_version, torch_cuda=torch_cuda, engine_cuda=engine_cuda_version(),
                          driver_version=driver, gpus=gpus, local_engine=local_engine)


def engine_cuda_version() -> str | None:
    """The CUDA runtime TurboMind links: the ``nvidia-cuda-runtime-cu12`` (or ``-cu13``) wheel's version."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime-cu13", "nvidia-cuda-runtime"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def read_proc_driver_version(path: Path = Path("/proc/driver/nvidia/version")) -> str | None:
    """The driver version from the kernel module's ``/proc`` file, or None."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    match = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return match.group(1) if match else None


def visible_indices(count: int, cuda_visible_devices: str | None) -> list[int]:
    """Which NVML indices ``CUDA_VISIBLE_DEVICES`` leaves visible (numeric lists only; UUIDs keep all)."""
    if cuda_visible_devices is None:
        return list(range(count))
    wanted: list[int] = []
    for part in cuda_visible_devices.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.lstrip("-").isdigit():
            return list(range(count))
        index = int(part)
        if index < 0 or index >= count:
            break  # CUDA stops at the first invalid entry
        wanted.append(index)
    return wanted


def _nvml_driver_and_gpus() -> tuple[str | None, list[Gpu]]:
    """Driver version and GPUs from NVML, or (None, []) when NVML is unavailable."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # no driver, no library, or no permission
        log.debug("NVML unavailable: %s", exc)
        return None, []
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        gpus = []
        for i in visible_indices(pynvml.nvmlDeviceGetCount(), os.environ.get("CUDA_VISIBLE_DEVICES")):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(Gpu(i, name.decode() if isinstance(name, bytes) else str(name), int(mem.total),
                            int(mem.free)))
        return driver, gpus
    except Exception as exc:
        log.warning("NVML query failed: %s", exc)
        return None, []
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
