"""The bench's blocked-FP8 writer (target 6), read back by the rules of LMDeploy 0.18's ``FP8Format``.

``lmdeploy.turbomind.weight_format`` cannot be imported without TurboMind's CUDA extension, so the
checks here restate its ``accepts`` (fp8 weight, float scales of ceil(out/128) x ceil(in/128)) and
``dequant`` (weight x scale repeated over each block); the bench's ``fp8`` tune variant loads the
result in TurboMind itself on the GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from legal_eagle.fp8 import QUANT_CONFIG, quantize_block_fp8, write_fp8_checkpoint
from legal_eagle.tiny_model import build_tiny_checkpoint

torch = pytest.importorskip("torch")


def test_block_quantization_round_trips_within_fp8_precision() -> None:
    weight = torch.randn(200, 300) * torch.logspace(-3, 1, 300)  # columns of very different size
    q, scales = quantize_block_fp8(weight)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (200, 300) and scales.shape == (2, 3)
    back = q.float() * scales.repeat_interleave(128, 0).repeat_interleave(128, 1)[:200, :300]
    err = (back - weight).abs() / weight.abs().clamp(min=1e-6)
    assert float(err.median()) < 0.04  # e4m3 keeps 3 mantissa bits: about 3 % relative rounding
    assert float(q.float().abs().max()) <= 448.0


def test_fp8_checkpoint_is_what_lmdeploys_fp8_format_accepts(tmp_path: Path) -> None:
    from safetensors import safe_open

    src = build_tiny_checkpoint(tmp_path / "llama", arch="llama", hidden_size=128, intermediate_size=256)
    out = tmp_path / "fp8"
    done = write_fp8_checkpoint(src, out, device="cpu")
    assert done["quantized_linears"] == 2 * 7  # q k v o gate up down in each of the 2 layers
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == QUANT_CONFIG
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".fp8.tmp-*"))
    originals = {}
    for shard in src.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            originals.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    written = {}
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            written.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    name = "model.layers.1.mlp.down_proj"
    weight, scales = written[name + ".weight"], written[name + ".weight_scale_inv"]
    assert weight.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32
    assert tuple(scales.shape) == (-(-weight.shape[0] // 128), -(-weight.shape[1] // 128))
    block = scales.repeat_interleave(128, 0).repeat_interleave(128, 1)[: weight.shape[0], : weight.shape[1]]
    back = weight.float() * block
    original = originals[name + ".weight"].float()
    assert back.shape == original.shape
    assert float((back - original).norm() / original.norm()) < 0.05
    assert written["model.embed_tokens.weight"].dtype == torch.float16  # embeddings and norms stay fp16
    assert written["model.layers.0.input_layernorm.weight"].dtype == originals[
        "model.layers.0.input_layernorm.weight"].dtype


H100 = ((9, 0), "NVIDIA H100 80GB HBM3")


def test_prepare_fp8_writes_once_reuses_and_never_publishes_half_a_copy(tmp_path: Path) -> None:
    from functools import partial

    from legal_eagle.errors import ModelPreparationError
    from legal_eagle.fp8 import FP8_MARKER
    from legal_eagle.prepare import prepare_model

    src = build_tiny_checkpoint(tmp_path / "tiny-internlm2", hidden_size=128, intermediate_size=256)
    cache = tmp_path / "cache"
    writes: list[Path] = []

    def cpu_writer(fp16: Path, out: Path, **kwargs: object) -> dict[str, object]:
        writes.append(out)
        return write_fp8_checkpoint(fp16, out, device="cpu", **kwargs)  # type: ignore[arg-type]

    prepared = prepare_model(str(src), cache_dir=cache, model_format="fp8", fp8_writer=cpu_writer,
                             gpu_capability=lambda: H100)
    assert prepared.model_format == "fp8" and prepared.path.name.endswith("-fp8")
    assert json.loads((prepared.path / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    assert prepared.fp16_path.name.endswith("-llama")  # converted from InternLM2 first
    assert prepared.manifest["source_fingerprint"] and (prepared.path / FP8_MARKER).is_file()
    again = prepare_model(str(src), cache_dir=cache, model_format="fp8", fp8_writer=cpu_writer,
                          gpu_capability=lambda: H100)
    assert again.path == prepared.path and len(writes) == 1  # the second start reuses the copy

    def killed(fp16: Path, out: Path, **kwargs: object) -> dict[str, object]:
        writes.append(out)
        (out.parent / f".{out.name}.tmp-killed").mkdir()  # what a process killed mid-write leaves
        raise RuntimeError("CUDA out of memory")

    fresh = tmp_path / "cache2"
    with pytest.raises(ModelPreparationError) as info:
        prepare_model(str(src), cache_dir=fresh, model_format="fp8", fp8_writer=killed,
                      gpu_capability=lambda: H100)
    assert "FP8" in info.value.user_message and not list(fresh.glob("*-fp8"))  # nothing published
    prepare_model(str(src), cache_dir=fresh, model_format="fp8", fp8_writer=cpu_writer, gpu_capability=lambda: H100)
    assert not list(fresh.glob(".*-fp8.tmp-*")) and len(writes) == 3  # the next start cleans up and writes
    # a copy whose marker says another fp16 source is written again, not used
    marker = prepared.path / FP8_MARKER
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "source_fingerprint": "other"}))
    prepare_model(str(src), cache_dir=cache, model_format="fp8", fp8_writer=partial(cpu_writer),
                  gpu_capability=lambda: H100)
    assert len(writes) == 4


def test_prepare_fp8_refuses_a_gpu_without_fp8_in_chinese_before_any_work(tmp_path: Path) -> None:
    from legal_eagle.errors import ModelPreparationError
    from legal_eagle.prepare import prepare_model

    def never(*args: object, **kwargs: object) -> dict[str, object]:
        raise AssertionError("must not be called")

    for gpu, words in ((((8, 6), "NVIDIA A10"), "NVIDIA A10，计算能力 8.6"), (((8, 0), "NVIDIA A100-SXM4-80GB"), "8.0"),
                       ((None, ""), "没有可用的 GPU")):
        with pytest.raises(ModelPreparationError) as info:
            prepare_model("owner/not-downloaded", cache_dir=tmp_path, model_format="fp8", fp8_writer=never,
                          gpu_capability=lambda gpu=gpu: gpu, downloader=never, probe=never)
        assert words in info.value.user_message and "--model-format awq" in info.value.user_message
    assert not list(tmp_path.iterdir())  # nothing downloaded or written


def test_a_write_that_fails_midway_leaves_neither_the_copy_nor_its_temp_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    src = build_tiny_checkpoint(tmp_path / "llama", arch="llama", hidden_size=128, intermediate_size=256)

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_fp8_checkpoint(src, tmp_path / "fp8", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


def test_compare_tab_says_why_it_has_nothing_to_compare_with_an_fp8_chat_model() -> None:
    from legal_eagle.config import Settings
    from legal_eagle.loader import Checkpoints, comparison_provider

    for fmt, words in (("fp8", "FP8 权重运行（--model-format fp8）"), ("hf", "当前以 fp16 运行")):
        settings = Settings(backend="turbomind", model_format=fmt)
        plan = comparison_provider(settings, None, Checkpoints()).plan  # type: ignore[arg-type]
        assert plan.mode == "unavailable" and words in plan.reason and "--model-format awq" in plan.reason
