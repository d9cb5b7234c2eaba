"""Test helpers: a reference InternLM2 forward pass and benign texts (no fixtures here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BENIGN_TEXTS = [
    "房东不退押金怎么办？",
    "根据《中华人民共和国民法典》第一百四十三条，民事法律行为有效。",
    "公司拖欠工资两个月，我可以申请劳动仲裁吗？ 2024年3月15日，金额100000元。",
    " 前导空格 and  double  spaces\n\n换行\t制表符",
    "Contract law, 30 days, 5000 yuan; 生僻字𠀀 and emoji 😀",
    "\n",
    "a",
]
CHAT = [
    {"role": "system", "content": "您是一个专业的律师，请根据您的知识进行专业、准确的回答。"},
    {"role": "user", "content": "借钱不还只有微信聊天记录可以起诉吗？"},
    {"role": "assistant", "content": "可以，微信聊天记录属于电子数据。"},
    {"role": "user", "content": "诉讼时效是多久？"},
]


def load_internlm2(model_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, float32 tensors) of an InternLM2 checkpoint directory."""
    from safetensors.torch import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    tensors: dict[str, Any] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update({k: v.float() for k, v in load_file(str(f)).items()})
    return cfg, tensors


def internlm2_forward(cfg: dict[str, Any], w: dict[str, Any], ids: list[int]) -> Any:
    """Logits [seq, vocab] of InternLM2 written from its definition (fused GQA wqkv, rotate-half RoPE)."""
    import torch

    hidden, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, groups, eps, n = hidden // heads, heads // kv, cfg["rms_norm_eps"], len(ids)

    def rms(x: Any, weight: Any) -> Any:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.outer(torch.arange(n).float(), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(x: Any) -> Any:
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = w["model.tok_embeddings.weight"][torch.tensor(ids)]
    mask = torch.full((n, n), float("-inf")).triu(1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "attention_norm.weight"])
        qkv = (h @ w[p + "attention.wqkv.weight"].T).view(n, kv, groups + 2, hd)
        q = qkv[:, :, :groups].reshape(n, heads, hd).transpose(0, 1)
        k = qkv[:, :, groups].transpose(0, 1).repeat_interleave(groups, 0)
        v = qkv[:, :, groups + 1].transpose(0, 1).repeat_interleave(groups, 0)
        att = torch.softmax(rope(q) @ rope(k).transpose(1, 2) / hd**0.5 + mask, -1) @ v
        x = x + att.transpose(0, 1).reshape(n, hidden) @ w[p + "attention.wo.weight"].T
        h = rms(x, w[p + "ffn_norm.weight"])
        gate = torch.nn.functional.silu(h @ w[p + "feed_forward.w1.weight"].T)
        x = x + (gate * (h @ w[p + "feed_forward.w3.weight"].T)) @ w[p + "feed_forward.w2.weight"].T
    return rms(x, w["model.norm.weight"]) @ w["output.weight"].T


def fake_quantizer(src: Path, work: Path, bits: int, group_size: int, samples: Any) -> None:
    """Stand-in for AWQ: copies the fp16 weights, marks the config, counts its calls in ``work/../calls``."""
    import shutil
    import time

    with open(work.parent / "calls", "a") as f:
        f.write(f"{work.name}\n")
    time.sleep(0.5)
    for f in src.glob("*.safetensors"):
        shutil.copyfile(f, work / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": bits, "group_size": group_size}
    (work / "config.json").write_text(json.dumps(cfg))


def fake_sanity(fp16_dir: Path, awq_dir: Path, prompts: Any, threshold: float) -> Any:
    """A sanity check that always passes with agreement 1.0."""
    from legal_eagle.sanity import SanityResult

    return SanityResult(1.0, 1.0, sum(len(p) for p in prompts), threshold, True, "fake", 0.0)


def quantize_in_subprocess(src: str, out: str) -> str:
    """Run quantize_model with the fakes (for the two-process lock test); returns the manifest's created."""
    from legal_eagle.quantize import QuantRequest, quantize_model

    _, manifest = quantize_model(QuantRequest(Path(src)), Path(out), quantizer=fake_quantizer,
                                 sanity_check=fake_sanity)
    return str(manifest["created"])
