"""Blocked FP8 weights (LMDeploy's ``model_format="fp8"``): ``--model-format fp8`` and the bench.

TurboMind 0.18 reads FP8 checkpoints in the layout of DeepSeek-V3 / Qwen3-FP8: every linear
weight of the decoder layers as ``float8_e4m3fn`` with a ``weight_scale_inv`` per 128 x 128 block
(the multiplier back to the real value) and ``quantization_config = {"quant_method": "fp8",
"weight_block_size": [128, 128]}``; embeddings, norms and the output head stay fp16. LMDeploy has
no tool that writes this format, so it is written here: round to nearest per block, no
calibration (8-bit floats with a scale per 128 x 128 block keep about 3 % relative error per
weight). On an H100 it decodes faster than fp16 at one user (docs/benchmarks.md); it needs a GPU
with FP8 support (compute capability 8.9 or more: Ada, Hopper), which an A10 or A100 is not.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from legal_eagle.convert import _iter_shard, staged_dir, weight_shards

MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9) and Hopper (9.0) and later
FP8_MARKER = "legal_eagle_fp8.json"  # written last: its source fingerprint says which fp16 copy this is
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


def capability_problem(capability: tuple[int, int] | None, gpu_name: str = "") -> str | None:
    """Why this GPU cannot run FP8 weights (Chinese, for the start page), or None when it can."""
    if capability is None:
        return "FP8 权重需要 NVIDIA GPU，这台机器上没有可用的 GPU。请改用 --model-format awq 或 hf。"
    if tuple(capability) < MIN_CAPABILITY:
        name = f"{gpu_name}，" if gpu_name else ""
        return (f"这块显卡（{name}计算能力 {capability[0]}.{capability[1]}）不支持 FP8 权重："
                "FP8 需要计算能力 8.9 及以上的显卡（如 L4、L40、RTX 4090、H100）。"
                "A10、A100 请改用 --model-format awq（4 比特，默认）或 hf（fp16）。")
    return None


def cuda_capability() -> tuple[tuple[int, int] | None, str]:
    """(compute capability, name) of GPU 0 as torch sees it; (None, "") without a usable GPU."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None, ""
        return tuple(torch.cuda.get_device_capability(0)), torch.cuda.get_device_name(0)  # type: ignore[return-value]
    except Exception:  # no torch, no driver: the same answer for the user
        return None, ""


def write_fp8_checkpoint(src: Path, out: Path, *, device: str = "cuda",
                         marker: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``src`` (a Llama-layout fp16 checkpoint) as blocked FP8 to ``out``; a dict of what was done.

    ``out`` appears by one rename when complete (a killed run leaves only a ``.out.tmp-*`` folder);
    ``marker`` (e.g. the source's fingerprint) goes into its ``legal_eagle_fp8.json``.
    """
    import torch
    from safetensors.torch import save_file

    src, out = Path(src), Path(out)
    shards = [s for s in weight_shards(src) if s.suffix == ".safetensors"]
    if not shards:
        raise ValueError(f"{src} has no safetensors weights")
    start = time.perf_counter()
    quantized = 0
    weight_map: dict[str, str] = {}
    with staged_dir(out) as tmp:
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
                    "config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", FP8_MARKER):
                shutil.copyfile(item, tmp / item.name)
        info = {"source": str(src.resolve()), "quantized_linears": quantized, "block": BLOCK, **(marker or {})}
        (tmp / FP8_MARKER).write_text(json.dumps(info, indent=2), encoding="utf-8")
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"fp8_dir": str(out), "quantized_linears": quantized, "seconds": time.perf_counter() - start}
