"""Model source resolution: local dirs, (fake) ModelScope downloads, offline, incomplete folders."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from legal_eagle.errors import ModelPreparationError, OfflineError
from legal_eagle.tiny_model import build_tiny_checkpoint
from legal_eagle.weights import checkpoint_problems, fingerprint, resolve_model

MODEL = "owner/Tiny-Model"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("w") / "tiny", max_shard_bytes=120_000)


class FakeHub:
    """A snapshot_download stand-in: copies ``tiny`` into the cache, or fails like modelscope."""

    def __init__(self, tiny: Path, cache: Path, fail: Exception | None = None) -> None:
        self.tiny, self.cache, self.fail, self.calls = tiny, cache, fail, []

    def __call__(self, model_id: str, **kw: Any) -> str:
        self.calls.append(kw)
        snap = self.cache / model_id / "snapshot"
        snap.mkdir(parents=True, exist_ok=True)  # modelscope leaves this folder even when it fails
        if kw.get("local_files_only"):
            if not any(snap.iterdir()):
                raise FileNotFoundError("CacheNotFound")
            return str(snap)
        if self.fail:
            raise self.fail
        for cb_cls in kw.get("progress_callbacks") or []:
            cb = cb_cls("model-00001.safetensors", 100)
            cb.update(100)
            cb.end()
        for f in self.tiny.iterdir():
            shutil.copyfile(f, snap / f.name)
        return str(snap)


def test_local_dir_used_as_is(tiny: Path) -> None:
    assert resolve_model(str(tiny)) == tiny
    assert checkpoint_problems(tiny) == []


def test_empty_or_cut_dir_is_not_a_model(tiny: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelPreparationError) as err:
        resolve_model(str(empty))
    assert "不完整" in err.value.user_message
    cut = tmp_path / "cut"
    shutil.copytree(tiny, cut)
    shard = sorted(cut.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])
    assert any("incomplete weight file" in p for p in checkpoint_problems(cut))
    missing = tmp_path / "missing"
    shutil.copytree(tiny, missing)
    sorted(missing.glob("model-*.safetensors"))[0].unlink()
    assert any("missing shard" in p for p in checkpoint_problems(missing))
    (missing / "tokenizer.model").unlink()
    assert any("tokenizer" in p for p in checkpoint_problems(missing))


def test_download_with_progress_then_cache_hit(tiny: Path, tmp_path: Path) -> None:
    hub = FakeHub(tiny, tmp_path / "cache")
    events: list[tuple[str, float | None, str]] = []
    path = resolve_model(MODEL, revision="v1", cache_dir=tmp_path / "cache", downloader=hub,
                         probe=lambda url, t: True, on_progress=lambda *a: events.append(a))
    assert checkpoint_problems(path) == [] and fingerprint(path) == fingerprint(tiny)
    real = [c for c in hub.calls if not c.get("local_files_only")]
    assert real[0]["revision"] == "v1" and real[0]["cache_dir"] == str(tmp_path / "cache")
    assert "*.safetensors" in real[0]["allow_patterns"] and "*.py" not in real[0]["allow_patterns"]
    assert ("download", 1.0, "model-00001.safetensors: 完成") in events
    hub.calls.clear()
    again = resolve_model(MODEL, cache_dir=tmp_path / "cache", downloader=hub,
                          probe=lambda url, t: pytest.fail("no network needed"))
    assert again == path and all(c.get("local_files_only") for c in hub.calls)


def test_offline_message_fast(tiny: Path, tmp_path: Path) -> None:
    from modelscope.hub.errors import NetworkError

    hub = FakeHub(tiny, tmp_path / "cache", fail=NetworkError("Connection refused"))
    start = time.monotonic()
    with pytest.raises(OfflineError) as err:
        resolve_model(MODEL, cache_dir=tmp_path / "cache", downloader=hub, probe=lambda url, t: True)
    assert time.monotonic() - start < 5
    msg = err.value.user_message
    assert "ModelScope" in msg and "--model-path" in msg and "LE_MODEL_PATH" in msg
    # The empty snapshot folder the failure left does not count as a model next time.
    snap = tmp_path / "cache" / MODEL / "snapshot"
    assert snap.is_dir() and checkpoint_problems(snap)
    with pytest.raises(OfflineError):
        resolve_model(MODEL, cache_dir=tmp_path / "cache", downloader=hub, probe=lambda url, t: False)


def test_probe_failure_skips_download(tiny: Path, tmp_path: Path) -> None:
    hub = FakeHub(tiny, tmp_path / "cache")
    with pytest.raises(OfflineError):
        resolve_model(MODEL, cache_dir=tmp_path / "cache", downloader=hub, probe=lambda url, t: False)
    assert all(c.get("local_files_only") for c in hub.calls)


def test_real_probe_times_out_quickly() -> None:
    from legal_eagle.weights import hub_reachable

    start = time.monotonic()
    assert hub_reachable("http://192.0.2.1:9", 1.0) is False  # TEST-NET-1: never answers
    assert time.monotonic() - start < 3


def test_incomplete_download_and_bad_source(tiny: Path, tmp_path: Path) -> None:
    class CutHub(FakeHub):
        def __call__(self, model_id: str, **kw: Any) -> str:
            path = Path(super().__call__(model_id, **kw))
            if not kw.get("local_files_only"):
                (path / "tokenizer.model").unlink()
            return str(path)

    with pytest.raises(ModelPreparationError, match="tokenizer") as err:
        resolve_model(MODEL, cache_dir=tmp_path / "c", downloader=CutHub(tiny, tmp_path / "c"),
                      probe=lambda url, t: True)
    assert "断点" in err.value.user_message
    with pytest.raises(ModelPreparationError) as err2:
        resolve_model("/no/such/dir")
    assert "找不到" in err2.value.user_message


def test_wrong_id_is_not_offline(tiny: Path, tmp_path: Path) -> None:
    from modelscope.hub.errors import NotExistError

    hub = FakeHub(tiny, tmp_path / "cache", fail=NotExistError("repo not found"))
    with pytest.raises(ModelPreparationError) as err:
        resolve_model(MODEL, cache_dir=tmp_path / "cache", downloader=hub, probe=lambda url, t: True)
    assert not isinstance(err.value, OfflineError) and "模型名称" in err.value.user_message
