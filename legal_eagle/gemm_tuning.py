"""TurboMind's GEMM tuning, kept in a file so that later starts of the same engine skip it.

When TurboMind 0.18 creates an engine it warms up (``TurboMind::Impl::WarmUp``): forward passes at a
series of token counts up to its largest forward batch, timing the candidate GEMM kernels for every
weight shape and keeping the fastest. With ``TM_GEMM_EXPORT=<file>`` it writes what it chose at the
end of that warm-up; with ``TM_GEMM_IMPORT=<file>`` it reads the file instead and skips the warm-up.
Measured on an H100 (docs/benchmarks.md, target 4: a 4-bit 7B serving 8 chats of 4k tokens, through
``TurbomindEngine.load``): a start that read the file loaded in 6.8-7.1 s against 7.6-8.3 s for one
that tuned and wrote it, at the same speed (380 tok/s). The load's peak GPU memory was 8.03-8.43 GiB
when tuning and 7.95-8.11 GiB when reading; that spread comes from what the memory pool reserves,
not from the file (tenth session).

A file is only right for the GPU, the LMDeploy build, the checkpoint's shapes and format and the
engine options it was tuned under, so its name is a digest of all of them: anything different tunes
afresh and writes a file of its own. The KV-cache share is left out (the app derives it from free
memory, and it changes no GEMM shape). TurboMind writes under a temporary name, which becomes the
file only after the engine has loaded; a load that fails while reading a file deletes it, so the
next start tunes again. A host's own ``TM_GEMM_*`` variables win: the app then leaves tuning alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from legal_eagle import metrics

log = logging.getLogger(__name__)

IMPORT, EXPORT = "TM_GEMM_IMPORT", "TM_GEMM_EXPORT"
HOST_VARIABLES = (IMPORT, EXPORT, "TM_GEMM_TUNE")  # set by the host: tuning is theirs
UNKEYED = frozenset({"cache_max_entry_count"})  # options that change no GEMM shape
_env_lock = threading.Lock()  # one load at a time sets the process's TM_GEMM_* variables

Mode = Literal["import", "export", "off"]


@dataclass
class Tuning:
    """What one load does with the tuning file.

    Attributes:
        mode: "import" (a file exists: TurboMind reads it and skips its warm-up), "export" (it tunes
            and the result becomes the file) or "off" (no place for a file, no GPU identity, or the
            host's own TM_GEMM_* variables).
        path: the tuning file (None when off).
        written: after an export, whether the file now exists.
    """

    mode: Mode
    path: Path | None = None
    written: bool = False

    def describe(self) -> str:
        """For ``EngineInfo.extra``: "import", "export" (+ " (no file)" when TurboMind wrote none) or "off"."""
        return f"{self.mode} (no file)" if self.mode == "export" and not self.written else self.mode


def tuning_key(model_dir: Path, options: Mapping[str, Any], gpu: str, lmdeploy_version: str) -> str:
    """A digest of what a tuning file depends on: GPU, LMDeploy, the checkpoint's config and options."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    blob = json.dumps({"gpu": gpu, "lmdeploy": lmdeploy_version, "config": config, "options": _keyed(options)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def _keyed(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options a tuning file depends on."""
    return {k: v for k, v in options.items() if k not in UNKEYED}


def lmdeploy_version() -> str | None:
    """The installed LMDeploy's version, or None."""
    try:
        return metadata.version("lmdeploy")
    except metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def tuning_for_load(folder: Path | None, model_dir: Path, options: Mapping[str, Any], *,
                    gpu: str | None = None, version: str | None = None,
                    environ: dict[str, str] | None = None) -> Iterator[Tuning]:
    """Point TurboMind at the tuning file for the engine load in the ``with`` block.

    Args:
        folder: where tuning files live (None: off).
        model_dir: the checkpoint being loaded (its config.json is part of the key).
        options: the ``TurbomindEngineConfig`` fields of the load.
        gpu: GPU identity (default: ``metrics.gpu_model(0)``); version: LMDeploy's (default: installed).
        environ: the environment to set (default ``os.environ``: TurboMind reads it with getenv).

    Yields:
        The ``Tuning``; after the block, ``written`` says whether an export left a file.
    """
    env = os.environ if environ is None else environ
    with _env_lock:
        off = folder is None or any(v in env for v in HOST_VARIABLES)
        if not off:  # the GPU and LMDeploy are asked only when a file could be used
            gpu = gpu if gpu is not None else metrics.gpu_model(0)
            version = version if version is not None else lmdeploy_version()
        if off or gpu is None or version is None:
            yield Tuning("off")
            return
        assert folder is not None
        path = Path(folder) / f"{tuning_key(model_dir, options, gpu, version)}.cache"
        if path.is_file() and path.stat().st_size > 0:
            tuning, variable, target = Tuning("import", path), IMPORT, path
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            target = path.with_name(f"{path.name}.{os.getpid()}.part")
            tuning, variable = Tuning("export", path), EXPORT
        env[variable] = str(target)
        try:
            yield tuning
        except BaseException:
            if tuning.mode == "import":  # it may be what failed: the next start tunes again
                log.warning("engine load failed while reading GEMM tuning file %s: deleting it", path)
                path.unlink(missing_ok=True)
            else:
                target.unlink(missing_ok=True)
            raise
        finally:
            env.pop(variable, None)
        if tuning.mode == "export":
            if target.is_file() and target.stat().st_size > 0:
                os.replace(target, path)
                _describe(path, model_dir, options, gpu, version)
                tuning.written = True
                log.info("GEMM tuning kept in %s: later starts skip TurboMind's warm-up", path)
            else:
                target.unlink(missing_ok=True)
                log.info("TurboMind wrote no GEMM tuning file (nothing to tune for %s)", model_dir)


def _describe(path: Path, model_dir: Path, options: Mapping[str, Any], gpu: str, version: str) -> None:
    """A readable note beside the tuning file: what it was tuned for."""
    note = {"model_dir": str(model_dir), "gpu": gpu, "lmdeploy": version,
            "options": _keyed(options)}
    with contextlib.suppress(OSError):
        path.with_suffix(".json").write_text(json.dumps(note, ensure_ascii=False, indent=1, default=str),
                                             encoding="utf-8")
