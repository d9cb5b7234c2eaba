"""Find the checkpoint: a local directory as is, or a ModelScope download (resumable, with progress).

A directory counts as a model only when it is complete: config.json parses, every weight
shard the index names is there and whole (safetensors: header and data length agree; .bin:
the zip directory reads), and a tokenizer is present. The empty folder a failed download
leaves, or a half-downloaded snapshot, is therefore never mistaken for a model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from legal_eagle.errors import ModelPreparationError, OfflineError

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, "float | None", str], None]
Downloader = Callable[..., str]  # modelscope.snapshot_download's signature
Probe = Callable[[str, float], bool]

LOCAL_SETTING_HINT = "--model-path /path/to/dir（或环境变量 LE_MODEL_PATH）"
META_PATTERNS = ["*.json", "tokenizer.model"]
_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _noop(stage: str, fraction: float | None, detail: str) -> None:
    """Progress sink that drops everything."""


def _safetensors_whole(path: Path) -> bool:
    """True when the file is as long as its header says (a cut download is not)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or n > 100_000_000 or 8 + n > size:
                return False
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return False
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return size == 8 + n + max(ends, default=0)


def _bin_whole(path: Path) -> bool:
    """True when a torch .bin (zip) file's directory reads (a cut download's does not)."""
    try:
        with zipfile.ZipFile(path) as z:
            return bool(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def checkpoint_problems(model_dir: Path) -> list[str]:
    """What keeps ``model_dir`` from being a complete checkpoint ([] when it is one)."""
    from legal_eagle.convert import weight_shards

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return [f"{model_dir} is not a directory"]
    problems: list[str] = []
    try:
        cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        if not (cfg.get("architectures") or cfg.get("model_type")):
            problems.append("config.json names no architecture")
    except (OSError, ValueError) as exc:
        problems.append(f"config.json unreadable: {exc}")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = model_dir / index_name
        if index.is_file():
            try:
                names = set(json.loads(index.read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError) as exc:
                problems.append(f"{index_name} unreadable: {exc}")
                names = set()
            problems += [f"missing shard {n}" for n in sorted(names) if not (model_dir / n).is_file()]
    shards = weight_shards(model_dir)
    if not shards:
        problems.append("no weights (*.safetensors or pytorch_model*.bin)")
    for shard in shards:
        whole = _safetensors_whole(shard) if shard.suffix == ".safetensors" else _bin_whole(shard)
        if shard.is_file() and not whole:
            problems.append(f"incomplete weight file {shard.name}")
    if not any((model_dir / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        problems.append("no tokenizer (tokenizer.model or tokenizer.json)")
    return problems


def fingerprint(model_dir: Path) -> str:
    """A checksum of a checkpoint: config/tokenizer contents plus weight file names and sizes."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    for f in sorted(model_dir.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name.endswith(".incomplete"):
            continue
        if f.suffix in (".json", ".model") and f.stat().st_size < 50_000_000:
            h.update(f"{f.name}\0".encode() + f.read_bytes())
        elif f.suffix in (".safetensors", ".bin"):
            h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
    return h.hexdigest()


def hub_reachable(endpoint: str, timeout: float) -> bool:
    """True when an HTTP(S) connection to the hub answers within ``timeout`` seconds (proxies honoured)."""
    import urllib.error
    import urllib.request

    result: list[bool] = []

    def attempt() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            result.append(True)
        except urllib.error.HTTPError:
            result.append(True)  # the server answered, even if not 2xx
        except (OSError, ValueError):
            result.append(False)

    # DNS lookups ignore socket timeouts: bound the whole attempt with a thread join.
    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def default_endpoint() -> str:
    """The ModelScope endpoint modelscope itself would use (MODELSCOPE_DOMAIN honoured)."""
    domain = os.environ.get("MODELSCOPE_DOMAIN", "www.modelscope.cn")
    return domain if urlparse(domain).scheme else f"https://{domain}"


def _offline(model_id: str, detail: str) -> OfflineError:
    """The OfflineError users see when the hub cannot be reached."""
    return OfflineError(
        f"无法连接 ModelScope（{urlparse(default_endpoint()).netloc}），也没有找到已下载完整的模型 {model_id}。"
        f"请检查网络后重试；或者在另一台联网的机器上下载模型目录，拷贝过来后用 {LOCAL_SETTING_HINT} 指定本地模型目录。",
        detail,
    )


def _progress_class(on_progress: ProgressFn) -> type:
    """A modelscope ProgressCallback subclass that forwards per-file progress to ``on_progress``."""
    from modelscope.hub.callback import ProgressCallback

    class _Forward(ProgressCallback):  # type: ignore[misc]
        def __init__(self, filename: str, file_size: int) -> None:
            super().__init__(filename, file_size)
            self.done, self.last = 0, 0.0

        def update(self, size: int) -> None:
            self.done += size
            now = time.monotonic()
            if now - self.last >= 0.5:
                self.last = now
                frac = self.done / self.file_size if self.file_size else None
                on_progress("download", frac, f"{self.filename}: {self.done / 2**20:.0f}/"
                                              f"{self.file_size / 2**20:.0f} MB")

        def end(self) -> None:
            on_progress("download", 1.0, f"{self.filename}: 完成")

    return _Forward


def _modelscope_download(*args: Any, **kwargs: Any) -> str:
    """modelscope.snapshot_download, imported lazily."""
    from modelscope import snapshot_download

    return str(snapshot_download(*args, **kwargs))


def download(model_id: str, *, revision: str | None, cache_dir: Path | None, on_progress: ProgressFn,
             downloader: Downloader, probe: Probe, probe_timeout: float) -> Path:
    """Download (or resume) ``model_id`` from ModelScope into the cache; return the complete snapshot."""
    kwargs: dict[str, Any] = {"revision": revision, "cache_dir": str(cache_dir) if cache_dir else None}
    try:  # a complete snapshot in the cache needs no network at all
        path = Path(downloader(model_id, local_files_only=True, allow_patterns=META_PATTERNS, **kwargs))
        if not checkpoint_problems(path):
            logger.info("using cached snapshot %s", path)
            return path
    except Exception as exc:  # noqa: BLE001 (CacheNotFound and friends: simply not cached yet)
        logger.debug("no complete cached snapshot of %s: %s", model_id, exc)
    on_progress("download", None, f"连接 ModelScope：{model_id}")
    if not probe(default_endpoint(), probe_timeout):
        raise _offline(model_id, f"probe of {default_endpoint()} failed within {probe_timeout}s")
    from legal_eagle.convert import weight_shards

    callbacks = [_progress_class(on_progress)]
    path = Path()
    try:
        # Weights in safetensors first; only when the repo has none fetch the .bin shards.
        for weights in ("*.safetensors", "*.bin"):
            path = Path(downloader(model_id, allow_patterns=[*META_PATTERNS, weights],
                                   progress_callbacks=callbacks, **kwargs))
            if weight_shards(path):
                break
    except (ConnectionError, TimeoutError) as exc:  # modelscope's NetworkError is a ConnectionError
        raise _offline(model_id, repr(exc)) from exc
    except OSError as exc:
        raise ModelPreparationError(f"下载模型 {model_id} 时出错（磁盘或文件问题）：{exc}", repr(exc)) from exc
    except Exception as exc:  # noqa: BLE001 (hub errors: wrong id, revision, permissions)
        raise ModelPreparationError(
            f"从 ModelScope 下载模型 {model_id} 失败：{exc}。请确认模型名称和版本，或用 {LOCAL_SETTING_HINT} "
            "指定本地模型目录。", repr(exc)) from exc
    problems = checkpoint_problems(path)
    if problems:
        raise ModelPreparationError(
            f"模型 {model_id} 下载不完整（{'; '.join(problems[:3])}）。重新启动即可从断点继续下载。",
            f"{path}: {problems}")
    on_progress("download", 1.0, f"模型已就绪：{path}")
    return path


def resolve_model(
    source: str,
    *,
    revision: str | None = None,
    cache_dir: Path | None = None,
    on_progress: ProgressFn | None = None,
    downloader: Downloader | None = None,
    probe: Probe | None = None,
    probe_timeout: float = 3.0,
) -> Path:
    """The directory of a complete checkpoint for ``source``.

    Args:
        source: a local checkpoint directory, or a ModelScope model id ("owner/name").
        revision: ModelScope revision (branch, tag or commit); None for the default.
        cache_dir: download cache; None lets modelscope decide (``MODELSCOPE_CACHE`` honoured).
        on_progress: ``(stage, fraction or None, detail)`` callback; stage is "download".
        downloader: ``modelscope.snapshot_download`` or a test fake with its signature.
        probe: ``(endpoint, timeout) -> reachable``; default: a short HTTP HEAD request.
        probe_timeout: seconds before the hub counts as unreachable.

    Returns:
        The checkpoint directory (validated: config, whole weight files, tokenizer).

    Raises:
        OfflineError: the hub cannot be reached and nothing complete is cached.
        ModelPreparationError: the directory is incomplete, or the download failed.
    """
    progress = on_progress or _noop
    path = Path(source).expanduser()
    if path.is_dir():
        problems = checkpoint_problems(path)
        if problems:
            raise ModelPreparationError(
                f"本地模型目录 {path} 不完整：{'; '.join(problems[:3])}。"
                "请提供包含 config.json、权重文件和分词器的目录。",
                f"{path}: {problems}")
        return path
    if not _MODEL_ID.match(source) or source.startswith((".", "/", "~")):
        raise ModelPreparationError(
            f"找不到模型 {source}：它既不是本地目录，也不像 ModelScope 模型名（例如 owner/name）。",
            f"bad model source {source!r}")
    return download(source, revision=revision, cache_dir=cache_dir, on_progress=progress,
                    downloader=downloader or _modelscope_download, probe=probe or hub_reachable,
                    probe_timeout=probe_timeout)
