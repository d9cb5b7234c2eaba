"""First-start AWQ: real lmdeploy AWQ on a tiny model, manifest reuse, lock, interruption, checks."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import threading
import time
from pathlib import Path

import pytest

from legal_eagle.calibration import CalibrationSpec, build_samples, split_pairs
from legal_eagle.errors import QuantizationError
from legal_eagle.prepare import prepare_model
from legal_eagle.quantize import MANIFEST, QuantRequest, file_lock, quantize_model
from legal_eagle.sanity import SanityResult, dequantized_state
from legal_eagle.tiny_model import build_tiny_checkpoint
from tests._checkpoints import fake_quantizer, fake_sanity, quantize_in_subprocess

TINY_THRESHOLD = 0.6  # random tiny weights: measured 0.79-0.81 top-1 agreement (real 7B: expect > 0.9)
SMALL_CALIB = CalibrationSpec(max_samples=4, seqlen=128)


@pytest.fixture(scope="module")
def internlm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # hidden 128 / intermediate 256: every linear's input is a multiple of AWQ's group size 128.
    return build_tiny_checkpoint(tmp_path_factory.mktemp("q") / "tiny-internlm2", hidden_size=128,
                                 intermediate_size=256)


@pytest.fixture(scope="module")
def llama(internlm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_model(str(internlm2), cache_dir=tmp_path_factory.mktemp("conv"), model_format="hf").fp16_path


def _calls(cache: Path) -> int:
    return len((cache / "calls").read_text().split()) if (cache / "calls").exists() else 0


@pytest.mark.slow
def test_real_awq_from_internlm2(internlm2: Path, tmp_path: Path) -> None:
    events: list[tuple] = []
    start = time.monotonic()
    prepared = prepare_model(str(internlm2), cache_dir=tmp_path, model_format="awq", calib=SMALL_CALIB,
                             min_agreement=TINY_THRESHOLD, on_progress=lambda *a: events.append(a))
    elapsed = time.monotonic() - start
    out = prepared.path_for_engine
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "awq" and cfg["quantization_config"]["bits"] == 4
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert str(f.get_tensor("model.layers.0.self_attn.q_proj.qweight").dtype) == "torch.int32"
    m = prepared.manifest
    assert m["quantization"]["calibration_samples"] == 4 and m["request"]["group_size"] == 128
    assert m["request"]["calibration"]["source"] == "builtin" and m["lmdeploy_version"]
    assert m["sanity_check"]["passed"] and m["sanity_check"]["agreement"] >= TINY_THRESHOLD
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (prepared.fp16_path / name).read_bytes()
    assert not (out / "inputs_stats.pth").exists()
    stages = {e[0] for e in events}
    assert {"convert", "quantize", "check"} <= stages
    print(f"\nAWQ via conversion on tiny: {elapsed:.1f}s, agreement {m['sanity_check']['agreement']:.3f}")


def test_dequantize_matches_round_to_nearest(llama: Path, tmp_path: Path) -> None:
    """Data-free AWQ is plain RTN: dequantizing the packed ints gives lmdeploy's fake-quant weights."""
    import torch
    from lmdeploy.lite.quantization.awq import pseudo_quantize_tensor
    from safetensors.torch import load_file

    out, _ = quantize_model(QuantRequest(llama, calib=CalibrationSpec(source="none"), min_agreement=0.0),
                            tmp_path / "rtn")
    ref = load_file(str(llama / "model.safetensors"))
    got = dequantized_state(out)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        want = pseudo_quantize_tensor(ref[name], 4, 128)  # fp16, as lmdeploy computes it
        assert torch.equal(got[name], want), name
        assert not torch.equal(got[name], ref[name]), "weights really were quantized"
    assert torch.equal(got["model.embed_tokens.weight"], ref["model.embed_tokens.weight"])


def test_dequantized_weights_replace_the_model_in_place(llama: Path, tmp_path: Path) -> None:
    """The sanity check overwrites the fp16 model's weights; a missing AWQ tensor is an error, not a skip."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM

    from legal_eagle.sanity import load_dequantized

    out, _ = quantize_model(QuantRequest(llama, calib=CalibrationSpec(source="none"), min_agreement=0.0),
                            tmp_path / "rtn")
    model = LlamaForCausalLM.from_pretrained(str(llama), dtype=torch.float32)
    load_dequantized(model, out, "cpu")
    want = dequantized_state(out)
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(model.get_parameter(name).to(torch.float16), want[name])
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.0.post_attention_layernorm.weight"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="post_attention_layernorm"):
        load_dequantized(model, broken, "cpu")


def test_reuse_and_mismatch_redo(llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "awq"
    req = QuantRequest(llama, calib=SMALL_CALIB)
    _, first = quantize_model(req, out, quantizer=fake_quantizer, sanity_check=fake_sanity)
    _, again = quantize_model(req, out, quantizer=fake_quantizer, sanity_check=fake_sanity)
    assert _calls(tmp_path) == 1 and again == first
    other = QuantRequest(llama, calib=CalibrationSpec(max_samples=2, seqlen=128))
    _, third = quantize_model(other, out, quantizer=fake_quantizer, sanity_check=fake_sanity)
    assert _calls(tmp_path) == 2 and third["request"]["calibration"]["max_samples"] == 2
    (out / "model.safetensors").write_bytes(b"\0" * 16)  # damaged weights: not reusable either
    quantize_model(other, out, quantizer=fake_quantizer, sanity_check=fake_sanity)
    assert _calls(tmp_path) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".awq.lock", "awq", "calls"]


def test_interrupted_runs_are_redone(llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "awq"
    (tmp_path / ".awq.tmp-killed").mkdir()
    shutil.copytree(llama, out)  # a complete-looking dir, but no manifest: never served
    calls: list[int] = []

    def crashing(*args: object) -> None:
        calls.append(1)
        raise RuntimeError("killed")

    with pytest.raises(QuantizationError):
        quantize_model(QuantRequest(llama, calib=SMALL_CALIB), out, quantizer=crashing, sanity_check=fake_sanity)
    assert calls and not list(tmp_path.glob(".awq.tmp-*")) and not (out / MANIFEST).exists()
    path, manifest = quantize_model(QuantRequest(llama, calib=SMALL_CALIB), out, quantizer=fake_quantizer,
                                    sanity_check=fake_sanity)
    assert (path / MANIFEST).is_file() and _calls(tmp_path) == 1


def test_failed_sanity_publishes_nothing(llama: Path, tmp_path: Path) -> None:
    def bad(fp16: Path, awq: Path, prompts: object, threshold: float) -> SanityResult:
        return SanityResult(0.3, 0.0, 10, threshold, False, "fake", 0.0)

    with pytest.raises(QuantizationError) as err:
        quantize_model(QuantRequest(llama, calib=SMALL_CALIB), tmp_path / "awq", quantizer=fake_quantizer,
                       sanity_check=bad)
    assert "30%" in err.value.user_message and not (tmp_path / "awq").exists()


def test_two_threads_quantize_once(llama: Path, tmp_path: Path) -> None:
    results: list[dict] = []
    waits: list[tuple] = []

    def run() -> None:
        results.append(quantize_model(QuantRequest(llama, calib=SMALL_CALIB), tmp_path / "awq",
                                      quantizer=fake_quantizer, sanity_check=fake_sanity,
                                      on_progress=lambda *a: waits.append(a))[1])

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert _calls(tmp_path) == 1 and len(results) == 3 and all(r == results[0] for r in results)
    assert any(stage == "wait" for stage, _, _ in waits)


@pytest.mark.slow
def test_two_processes_quantize_once(llama: Path, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        created = pool.starmap(quantize_in_subprocess, [(str(llama), str(tmp_path / "awq"))] * 2)
    assert _calls(tmp_path) == 1 and created[0] == created[1]


def test_lock_timeout_message(tmp_path: Path) -> None:
    lock = tmp_path / ".x.lock"
    with file_lock(lock, timeout=1):
        start = time.monotonic()
        with pytest.raises(QuantizationError) as err, file_lock(lock, timeout=0.3):
            pass
        assert time.monotonic() - start < 2 and "另一个进程" in err.value.user_message


def test_calibration_samples(llama: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama))
    samples = build_samples(tok, CalibrationSpec(max_samples=3, seqlen=64))
    assert len(samples) == 3 and all(s.shape == (1, 64) and str(s.dtype) == "torch.int64" for s in samples)
    assert samples[0][0, 0].item() == tok.convert_tokens_to_ids("<s>")
    assert build_samples(tok, CalibrationSpec(source="none")) == []
    custom = tmp_path / "mine.txt"
    custom.write_text("问：甲？\n答：乙。\n\n纯文本段落。" * 50, encoding="utf-8")
    spec = CalibrationSpec(source="file", path=custom, max_samples=2, seqlen=32)
    assert len(build_samples(tok, spec)) == 2
    assert split_pairs("问：甲？\n答：乙。\n\n纯文本") == [("甲？", "乙。"), ("", "纯文本")]
    before = spec.describe()["sha256"]
    custom.write_text("问：丙？\n答：丁。" * 50, encoding="utf-8")
    assert spec.describe()["sha256"] != before
    with pytest.raises(ValueError, match="seqlen"):
        CalibrationSpec(seqlen=4)
    with pytest.raises(ValueError, match="path"):
        CalibrationSpec(source="file")


def test_builtin_calibration_text_is_legal_chinese() -> None:
    from legal_eagle.calibration import BUILTIN_PATH

    text = BUILTIN_PATH.read_text(encoding="utf-8")
    pairs = split_pairs(text)
    assert 30_000 <= len(text.encode()) <= 60_000 and len(pairs) >= 30
    assert all(q and a for q, a in pairs) and sum("《" in a for _, a in pairs) >= 25


def test_prepare_hf_reuses_conversion(internlm2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = prepare_model(str(internlm2), cache_dir=tmp_path, model_format="hf")
    assert first.model_format == "hf" and first.path_for_engine == first.fp16_path != internlm2
    import legal_eagle.prepare as prep

    monkeypatch.setattr(prep, "convert_checkpoint", lambda *a, **k: pytest.fail("converted twice"))
    assert prepare_model(str(internlm2), cache_dir=tmp_path, model_format="hf") == first
    llama_src = prepare_model(str(first.fp16_path), cache_dir=tmp_path / "x", model_format="hf")
    assert llama_src.fp16_path == first.fp16_path  # a Llama source is used as is
    with pytest.raises(ValueError, match="model_format"):
        prepare_model(str(internlm2), cache_dir=tmp_path, model_format="gguf")  # type: ignore[arg-type]


def test_prepare_from_model_id_with_fakes(internlm2: Path, tmp_path: Path) -> None:
    from tests.test_weights import FakeHub

    hub = FakeHub(internlm2, tmp_path / "ms")
    prepared = prepare_model("owner/Tiny-Model", revision="v1.0", cache_dir=tmp_path / "cache",
                             download_dir=tmp_path / "ms", model_format="awq", calib=SMALL_CALIB,
                             downloader=hub, probe=lambda url, t: True, quantizer=fake_quantizer,
                             sanity_check=fake_sanity)
    assert prepared.manifest["source"]["model_id"] == "owner/Tiny-Model"
    assert prepared.manifest["source"]["revision"] == "v1.0"
    assert prepared.path_for_engine.parent == tmp_path / "cache" and prepared.model_format == "awq"
    assert json.loads((prepared.fp16_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    # A conversion left without its source fingerprint (killed before publish) is redone, not served.
    marker = prepared.fp16_path / "legal_eagle_conversion.json"
    marker.write_text("{}")
    (tmp_path / "cache" / f".{prepared.fp16_path.name}.tmp-old").mkdir()
    again = prepare_model(str(prepared.source_path), cache_dir=tmp_path / "cache", model_format="hf")
    assert "source_fingerprint" in json.loads(marker.read_text()) and again.fp16_path == prepared.fp16_path
    assert not list((tmp_path / "cache").glob(".*.tmp-*"))
