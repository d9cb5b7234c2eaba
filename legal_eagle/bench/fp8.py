"""Blocked FP8 weights (LMDeploy's ``model_format="fp8"``) for the bench's target-6 experiment.

TurboMind 0.18 reads FP8 checkpoints in the layout of DeepSeek-V3 / Qwen3-FP8: every linear
weight of the decoder layers as ``float8_e4m3fn`` with a ``weight_scale_inv`` per 128 x 128 block
(the multiplier back to the real value) and ``quantization_config = {"quant_method": "fp8",
"weight_block_size": [128, 128]}``; embeddings, norms and the output head stay fp16. LMDeploy has
no tool that writes this format, so the bench writes it here (round to nearest per block, no
calibration: the kernels and bytes are those of any such checkpoint; only the scales differ).
It is an 8-bit format, not the app's 4-bit one: the experiment asks whether any LMDeploy weight
format decodes faster than fp16 at batch 1 on the GPU at hand.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from legal_eagle.convert import _iter_shard, weight_shards

BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn
LINEAR_SUFFIXES = (
    "q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
    "gate_proj.weight", "up_proj.weight", "down_proj.weight",
)
QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [BLOCK, BLOCK]}


def quantize_block_fp8(weight: Any, block: int = BLOCK) -> tuple[Any, Any]:
    """``weight`` [out, in] -> (float8_e4m3fn weight, float32 scales [ceil(out/b), ceil(in/b)]).

    ``weight ≈ fp8.float() * scales`` repeated over each block (what LMDeploy's ``FP8Format.dequant`` does).
    """
    import torch

    out_f, in_f = weight.shape
    rows, cols = -(-out_f // block), -(-in_f // block)
    w = weight.float()
    padded = torch.zeros(rows * block, cols * block, dtype=torch.float32, device=w.device)
    padded[:out_f, :in_f] = w
    blocks = padded.view(rows, block, cols, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scales = amax / FP8_MAX
    q = (blocks / scales[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.view(rows * block, cols * block)[:out_f, :in_f].to(torch.float8_e4m3fn)
    return q.contiguous(), scales.contiguous()


def write_fp8_checkpoint(src: Path, out: Path, *, device: str = "cuda") -> dict[str, Any]:
    """Write ``src`` (a Llama-layout fp16 checkpoint) as blocked FP8 to ``out``; a dict of what was done.

    ``out`` appears by one rename when complete (a killed run leaves only a ``.out.tmp-*`` folder).
    """
    import torch
    from safetensors.torch import save_file

    src, out = Path(src), Path(out)
    shards = [s for s in weight_shards(src) if s.suffix == ".safetensors"]
    if not shards:
        raise ValueError(f"{src} has no safetensors weights")
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    quantized = 0
    weight_map: dict[str, str] = {}
    try:
        for k, shard in enumerate(shards):
            tensors: dict[str, Any] = {}
            for name, tensor in _iter_shard(shard):
                if name.endswith(LINEAR_SUFFIXES) and tensor.dim() == 2:
                    q, scales = quantize_block_fp8(tensor.to(device))
                    tensors[name] = q.cpu()
                    tensors[name.removesuffix(".weight") + ".weight_scale_inv"] = scales.cpu()
                    quantized += 1
                else:
                    tensors[name] = tensor
            file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, file))
        index = {"metadata": {}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
        config = json.loads((src / "config.json").read_text(encoding="utf-8"))
        config["quantization_config"] = dict(QUANT_CONFIG)
        config["torch_dtype"] = "float16"
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        for item in src.iterdir():  # tokenizer, generation config, chat template
            if item.is_file() and not item.name.endswith((".safetensors", ".bin")) and item.name not in (
                    "config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"):
                shutil.copyfile(item, tmp / item.name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"fp8_dir": str(out), "quantized_linears": quantized, "seconds": time.perf_counter() - start}
