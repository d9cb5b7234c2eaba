"""On the GPU: TurboMind's own InternLM2 reader and TurboMind on the converted Llama dir agree.

Run: ``python -m pytest -q -s tests/gpu/test_convert_turbomind.py`` (the 7B-shape case writes
2 x 15 GB to a temp dir and takes a few minutes; ``-k small`` runs only the small shape).
Each engine runs in its own process so that GPU memory is released between them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from legal_eagle.convert import convert_checkpoint, weight_shards
from legal_eagle.engines import turbomind_available
from legal_eagle.tiny_model import build_tiny_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not turbomind_available(), reason="needs TurboMind + GPU")]

PROMPT = "<s><|im_start|>user\n房东不退押金怎么办？<|im_end|>\n<|im_start|>assistant\n"
_RUNNER = r"""
import json, sys, time
from lmdeploy import GenerationConfig, TurbomindEngineConfig, pipeline
path, fmt, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
t = time.time()
pipe = pipeline(path, backend_config=TurbomindEngineConfig(model_format=fmt, session_len=1024,
                cache_max_entry_count=0.05, max_batch_size=1))
load_s = time.time() - t
gen = GenerationConfig(do_sample=False, max_new_tokens=48, ignore_eos=True)
out = pipe.infer(prompt, gen_config=gen, do_preprocess=False)
pipe.close()
print("RESULT " + json.dumps({"ids": list(out.token_ids), "load_s": load_s}))
"""


def greedy_tokens(model_dir: Path, model_format: str = "hf") -> list[int]:
    """48 greedy token ids from TurboMind in a fresh process."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", _RUNNER, str(model_dir), model_format, PROMPT],
                          capture_output=True, text=True, timeout=540, env=dict(os.environ))
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    result = json.loads(line[7:])
    print(f"{model_dir.name} ({model_format}): load {result['load_s']:.1f}s, total {time.time() - t0:.1f}s,"
          f" ids {result['ids'][:12]}...")
    return list(result["ids"])


def _with_converted_tokenizer(internlm2: Path, llama: Path, out: Path) -> Path:
    """The InternLM2 weights and config (symlinked) with the remote-code-free tokenizer files."""
    out.mkdir()
    for f in internlm2.iterdir():
        if f.name not in ("tokenizer_config.json",):
            (out / f.name).symlink_to(f)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).symlink_to(llama / name)
    return out


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param(dict(hidden_size=512, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=1024,
                          vocab_size=1024), id="small"),
        pytest.param(dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                          intermediate_size=14336, vocab_size=92544, max_shard_bytes=2 * 1024**3), id="7b",
                     marks=pytest.mark.slow),
    ],
)
def test_native_internlm2_equals_converted_llama(tmp_path: Path, shape: dict) -> None:
    t = time.time()
    src = build_tiny_checkpoint(tmp_path / "internlm2", device="cuda", **shape)
    print(f"\nbuilt {len(weight_shards(src))} shard(s) in {time.time() - t:.1f}s")
    t = time.time()
    dst = convert_checkpoint(src, tmp_path / "llama")
    print(f"converted in {time.time() - t:.1f}s")
    native = greedy_tokens(_with_converted_tokenizer(src, dst, tmp_path / "internlm2_tm"))
    converted = greedy_tokens(dst)
    assert len(native) == 48
    assert native == converted


def test_first_start_awq_runs_on_turbomind(tmp_path: Path) -> None:
    """prepare_model(awq) on the GPU (AWQ + sanity check on CUDA), then TurboMind loads the 4-bit dir."""
    from legal_eagle.calibration import CalibrationSpec
    from legal_eagle.prepare import prepare_model

    src = build_tiny_checkpoint(tmp_path / "internlm2", device="cuda", hidden_size=512, num_layers=2,
                                num_heads=4, num_kv_heads=2, intermediate_size=1024, vocab_size=1024)
    t = time.time()
    prepared = prepare_model(str(src), cache_dir=tmp_path / "cache", model_format="awq",
                             calib=CalibrationSpec(max_samples=16, seqlen=256), min_agreement=0.5)
    sanity = prepared.manifest["sanity_check"]
    print(f"\nprepare_model(awq) on GPU: {time.time() - t:.1f}s, sanity {sanity}")
    fp16 = greedy_tokens(prepared.fp16_path, "hf")
    awq = greedy_tokens(prepared.path_for_engine, "awq")
    same = next((i for i, (a, b) in enumerate(zip(fp16, awq, strict=True)) if a != b), len(fp16))
    print(f"fp16 vs 4-bit TurboMind: first {same} of 48 greedy tokens equal (random weights)")
    assert len(awq) == 48 and "cuda" in sanity["method"]
