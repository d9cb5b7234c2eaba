"""The GPU memory plan for the fp16 vs 4-bit comparison, from given memory numbers (no GPU needed)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from legal_eagle.engines.fake import FakeEngine
from legal_eagle.errors import GpuMemoryError
from legal_eagle.planner import (
    CONTEXT_BYTES,
    ENGINE_OVERHEAD_BYTES,
    GiB,
    PlannedProvider,
    plan_comparison,
    weights_bytes,
)

GB = 10**9
AWQ_7B = int(5.2 * GB)  # InternLM2-7B AWQ files: 4-bit layers + fp16 embeddings and head
FP16_7B = int(15.5 * GB)  # 7.74 B parameters x 2 bytes
# (free right after boot, total) as NVML reports them, in bytes
CARDS = {
    "A10 24GB": (23_700 * 10**6, 24_146 * 10**6),
    "T4 16GB": (15_600 * 10**6, 16_106 * 10**6),
    "A100 40GB": (42_100 * 10**6, 42_505 * 10**6),
    "A100 80GB": (84_500 * 10**6, 85_100 * 10**6),
    "H100 80GB": (84_600 * 10**6, 85_520 * 10**6),
}


@pytest.mark.parametrize(("card", "mode"), [("A10 24GB", "exclusive"), ("T4 16GB", "unavailable"),
                                            ("A100 40GB", "both-resident"), ("A100 80GB", "both-resident"),
                                            ("H100 80GB", "both-resident")])
def test_plan_before_loading_on_known_cards(card: str, mode: str) -> None:
    free, total = CARDS[card]
    plan = plan_comparison(free, total, AWQ_7B, FP16_7B, chat_engine_loaded=False)
    assert plan.mode == mode
    if mode == "unavailable":
        assert "显存不足" in plan.reason and "聊天功能不受影响" in plan.reason
        assert plan.fp16_cache_share is None and plan.chat_cache_share is None
    elif mode == "exclusive":  # the chat engine keeps the share it asked for; the fp16 one gets the card alone
        assert plan.chat_cache_share is None and plan.fp16_cache_share is not None
        assert "聊天暂停" in plan.reason and "依次计时" in plan.reason
    else:
        assert plan.fp16_cache_share is not None and 0.01 <= plan.fp16_cache_share <= 0.95
        assert plan.chat_cache_share is not None and 0.01 <= plan.chat_cache_share <= 0.5


def test_no_gpu_or_no_turbomind_is_unavailable_with_a_chinese_reason() -> None:
    for plan in (plan_comparison(None, None, AWQ_7B, FP16_7B, False),
                 plan_comparison(*CARDS["H100 80GB"], AWQ_7B, FP16_7B, False, turbomind_available=False)):
        assert plan.mode == "unavailable" and not plan.available
        assert "未检测到可用的 NVIDIA GPU" in plan.reason
        assert "对比不可用" in plan.describe()


def test_a10_plans_exclusive_turns_from_the_numbers() -> None:
    free, total = CARDS["A10 24GB"]
    plan = plan_comparison(free, total, AWQ_7B, FP16_7B, chat_engine_loaded=False)
    assert plan.mode == "exclusive" and plan.available and "轮流独占" in plan.describe()
    fp16_alone = FP16_7B + ENGINE_OVERHEAD_BYTES + plan.fp16_cache_share * (free - FP16_7B)  # type: ignore[operator]
    assert fp16_alone <= free - plan.reserve_bytes  # alone on the card it fits
    assert free - plan.reserve_bytes < FP16_7B + AWQ_7B + 2 * ENGINE_OVERHEAD_BYTES  # together it would not
    chat_held = int(9.4 * GB)  # the 4-bit engine took its measured 9.4 GB
    after_chat = plan_comparison(free - chat_held, total, AWQ_7B, FP16_7B, chat_engine_loaded=True,
                                 chat_held_bytes=chat_held)
    assert after_chat.mode == "exclusive"
    unknown = plan_comparison(free - chat_held, total, AWQ_7B, FP16_7B, chat_engine_loaded=True)
    assert unknown.mode == "unavailable" and "已加载" in unknown.reason and "24.1 GB" in unknown.reason


def test_host_can_forbid_pausing_the_chat_and_is_told_why() -> None:
    plan = plan_comparison(*CARDS["A10 24GB"], AWQ_7B, FP16_7B, chat_engine_loaded=False, allow_exclusive=False)
    assert plan.mode == "unavailable" and "LE_COMPARE_PAUSE_CHAT" in plan.reason
    assert "24.1 GB" in plan.reason and "15.5 GB" in plan.reason  # the card and the fp16 weights


def test_t4_cannot_hold_fp16_even_alone() -> None:
    plan = plan_comparison(*CARDS["T4 16GB"], AWQ_7B, FP16_7B, chat_engine_loaded=False)
    assert plan.mode == "unavailable" and "即使卸载" in plan.reason and "16.1 GB" in plan.reason


def test_chat_engine_already_loaded_plans_from_what_it_left() -> None:
    total = CARDS["A100 40GB"][1]
    roomy = plan_comparison(30 * GB, total, AWQ_7B, FP16_7B, chat_engine_loaded=True)
    tight = plan_comparison(20 * GB, total, AWQ_7B, FP16_7B, chat_engine_loaded=True)
    full = plan_comparison(16 * GB, total, AWQ_7B, FP16_7B, chat_engine_loaded=True)
    assert (roomy.mode, tight.mode, full.mode) == ("both-resident", "time-shared", "unavailable")
    assert roomy.chat_cache_share is None and tight.chat_cache_share is None
    assert "按需加载" in tight.reason and "照常工作" in tight.reason
    # the A100 40GB would fit if planned before the chat engine took half of the card as KV cache
    assert "cache_max_entry_count" in full.reason


def test_a_32gb_card_time_shares_rather_than_starve_the_chat_kv_cache() -> None:
    plan = plan_comparison(33_800 * 10**6, 34_100 * 10**6, AWQ_7B, FP16_7B, chat_engine_loaded=False)
    assert plan.mode == "time-shared"
    chat_kv = plan.chat_cache_share * (33_800 * 10**6 - AWQ_7B)  # type: ignore[operator]
    assert chat_kv >= 3 * GiB  # the chat engine keeps a useful cache; the fp16 engine comes and goes


def _simulate(free: int, total: int, plan_share_chat: float, plan_share_fp16: float,
              overhead: int, context: int) -> int:
    """Peak bytes in use if TurboMind measured free memory right after the weights (worst case)."""
    chat_kv = plan_share_chat * (free - AWQ_7B)
    used = AWQ_7B + chat_kv + overhead + context
    fp16_kv = plan_share_fp16 * (free - used - FP16_7B)
    return int(used + FP16_7B + fp16_kv + overhead)


@pytest.mark.parametrize("overhead_gib", [0.5, 2.0])  # buffers smaller than assumed, or as assumed
def test_planned_shares_never_overfill_the_card(overhead_gib: float) -> None:
    checked = 0
    for total_gb in (24, 32, 40, 48, 80, 96, 141, 192):
        total = total_gb * GB
        for used_gb in range(0, total_gb, 3):  # other processes may already hold memory
            free = total - used_gb * GB
            plan = plan_comparison(free, total, AWQ_7B, FP16_7B, chat_engine_loaded=False)
            if not plan.available:
                continue
            assert plan.fp16_cache_share
            if plan.mode == "exclusive":  # one engine at a time: the fp16 one alone must fit
                alone = FP16_7B + int(overhead_gib * GiB) + plan.fp16_cache_share * (free - FP16_7B)
                assert alone <= free - plan.reserve_bytes, (total_gb, used_gb, plan)
                checked += 1
                continue
            assert plan.chat_cache_share
            peak = _simulate(free, total, plan.chat_cache_share, plan.fp16_cache_share,
                             int(overhead_gib * GiB), CONTEXT_BYTES if overhead_gib >= 2 else 0)
            assert peak <= free - plan.reserve_bytes, (total_gb, used_gb, plan)
            checked += 1
    assert checked > 50


def test_resident_plans_keep_the_headroom_free() -> None:
    free, total = CARDS["H100 80GB"]
    plan = plan_comparison(free, total, AWQ_7B, FP16_7B, chat_engine_loaded=True)
    assert plan.mode == "both-resident" and plan.fp16_kv_bytes is not None
    left = free - FP16_7B - ENGINE_OVERHEAD_BYTES - plan.fp16_kv_bytes
    assert left >= plan.headroom_bytes + plan.reserve_bytes


def test_bad_share_is_a_value_error_with_the_range() -> None:
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        plan_comparison(*CARDS["H100 80GB"], AWQ_7B, FP16_7B, False, chat_cache_share_wanted=1.5)


def test_weights_bytes_reads_file_sizes(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    (tmp_path / "model-00001.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / "model-00002.safetensors").write_bytes(b"\0" * 500)
    assert weights_bytes(tmp_path) == 1500
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    assert weights_bytes(tmp_path) == 750  # fp32 files load as fp16
    with pytest.raises(ValueError, match="config.json"):
        weights_bytes(tmp_path / "missing")


class _Gpu:
    """A pretend GPU: loading an engine takes memory, closing gives it back."""

    def __init__(self, free: int, total: int) -> None:
        self.free, self.total, self.process = free, total, 0

    def take(self, n: int) -> None:
        self.free -= n
        self.process += n


class _ClosingEngine(FakeEngine):
    """A fake engine that gives its memory back on close."""

    def __init__(self, gpu: _Gpu, size: int) -> None:
        super().__init__(name="fp16")
        self.gpu, self.size, self.closed = gpu, size, False

    def close(self) -> None:
        self.closed = True
        self.gpu.take(-self.size)


def _provider(gpu: _Gpu, loads: list[float]) -> PlannedProvider:
    def loader(share: float) -> FakeEngine:
        loads.append(share)
        gpu.take(18 * GB)
        return _ClosingEngine(gpu, 18 * GB)

    return PlannedProvider(loader, sizes=lambda: (AWQ_7B, FP16_7B),
                           chat_engine_loaded=lambda: True, gpu_free_total=lambda: (gpu.free, gpu.total),
                           process_memory=lambda: gpu.process, turbomind_available=lambda: True)


def test_time_shared_provider_loads_per_comparison_and_frees_after() -> None:
    gpu = _Gpu(free=20 * GB, total=42 * GB)
    shares: list[float] = []
    provider = _provider(gpu, shares)
    assert provider.plan.mode == "time-shared" and provider.held_bytes() is None
    said: list[str] = []
    for _ in range(2):
        with provider.acquire(said.append) as engine:
            assert provider.held_bytes() == 18 * GB and gpu.free == 2 * GB
            assert provider.plan.mode == "time-shared"  # the plan in force, not one from the full card
        assert engine.closed and gpu.free == 20 * GB  # type: ignore[attr-defined]
    assert provider.loads == 2 and len(shares) == 2 and 0.01 <= shares[0] <= 0.95
    assert any("正在加载 fp16 模型" in m for m in said) and any("释放" in m for m in said)


def test_time_shared_provider_frees_even_when_the_comparison_fails() -> None:
    gpu = _Gpu(free=20 * GB, total=42 * GB)
    provider = _provider(gpu, [])
    with pytest.raises(RuntimeError), provider.acquire():
        raise RuntimeError("comparison broke")
    assert gpu.free == 20 * GB and provider.held_bytes() is None


def test_resident_provider_loads_once() -> None:
    gpu = _Gpu(free=60 * GB, total=85 * GB)
    provider = _provider(gpu, [])
    for _ in range(3):
        with provider.acquire():
            pass
    assert provider.loads == 1 and provider.plan.mode == "both-resident" and gpu.free == 42 * GB
    provider.close()
    assert gpu.free == 60 * GB and provider.held_bytes() is None


def test_provider_refuses_to_load_when_memory_went_away() -> None:
    gpu = _Gpu(free=20 * GB, total=42 * GB)
    shares: list[float] = []
    provider = _provider(gpu, shares)
    gpu.take(10 * GB)  # someone else took memory since the page was drawn
    with pytest.raises(GpuMemoryError) as info, provider.acquire():
        pass
    assert shares == [] and "显存不足" in info.value.user_message


def test_second_comparison_waits_for_the_first() -> None:
    gpu = _Gpu(free=20 * GB, total=42 * GB)
    provider = _provider(gpu, [])
    entered, release, said = threading.Event(), threading.Event(), []

    def first() -> None:
        with provider.acquire():
            entered.set()
            release.wait(5)

    thread = threading.Thread(target=first)
    thread.start()
    assert entered.wait(5)
    done = threading.Event()

    def second() -> None:
        with provider.acquire(said.append):
            done.set()

    other = threading.Thread(target=second)
    other.start()
    time.sleep(0.2)
    assert not done.is_set() and any("等待" in m for m in said)  # one time-shared load at a time
    release.set()
    thread.join(5)
    other.join(5)
    assert done.is_set() and provider.loads == 2 and gpu.free == 20 * GB


def test_provider_waits_for_the_checkpoints_to_exist() -> None:
    provider = PlannedProvider(lambda share: FakeEngine(), sizes=lambda: None,
                               chat_engine_loaded=lambda: False, gpu_free_total=lambda: (80 * GB, 85 * GB),
                               turbomind_available=lambda: True)
    assert provider.plan.mode == "unavailable" and "还在准备中" in provider.plan.reason
    with pytest.raises(GpuMemoryError), provider.acquire():
        pass


def test_turbomind_provider_reads_sizes_once_the_model_is_prepared(tmp_path: Path) -> None:
    from legal_eagle.planner import turbomind_provider

    dirs: list[tuple[Path, Path]] = []
    for name, size in (("awq", 5), ("fp16", 15)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "model.safetensors").write_bytes(b"\0" * size)
    provider = turbomind_provider(lambda: dirs[0] if dirs else None, lambda: True, session_len=4096)
    assert "还在准备中" in provider.plan.reason
    dirs.append((tmp_path / "awq", tmp_path / "fp16"))
    assert "还在准备中" not in provider.plan.reason  # planned from the files now (no GPU here: unavailable)


def test_missing_checkpoint_files_make_the_plan_unavailable(tmp_path: Path) -> None:
    from legal_eagle.planner import turbomind_provider

    dirs = (tmp_path / "awq", tmp_path / "gone")
    provider = turbomind_provider(lambda: dirs, lambda: True, session_len=4096)
    assert provider.plan.mode == "unavailable" and "找不到" in provider.plan.reason
