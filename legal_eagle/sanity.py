"""Does the 4-bit model still pick the fp16 model's next tokens? A check that runs on CPU.

The AWQ output (``qweight``/``qzeros``/``scales``, AWQ gemm packing) is dequantized back to
fp16 and put into the fp16 Llama model in place of its weights (smoothed norms included), so
both variants run through the same transformers code. The score is top-1 next-token
agreement over every position of a few Chinese legal prompts (teacher-forced).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an int32 holds column 8*c + AWQ_ORDER[i]
SANITY_QUESTIONS = (
    "房东不退押金怎么办？",
    "公司拖欠工资两个月，我可以怎么维权？",
    "交通事故对方全责但拒不赔偿，应该怎么处理？",
    "借钱不还只有微信聊天记录，可以起诉吗？",
    "离婚时婚前买的房子怎么分？",
    "网购买到假货，可以要求几倍赔偿？",
    "试用期被辞退，公司需要支付经济补偿吗？",
    "邻居装修把我家墙面弄裂了，该找谁赔？",
)


@dataclass(frozen=True)
class SanityResult:
    """Top-1 agreement between the fp16 and 4-bit models.

    Attributes:
        agreement: share of positions where both pick the same next token (0..1).
        last_token_agreement: the same, only at each prompt's last position.
        positions: positions compared.
        threshold: the minimum ``agreement`` asked for.
        passed: agreement >= threshold.
        method: how it was measured.
        seconds: time the check took.
    """

    agreement: float
    last_token_agreement: float
    positions: int
    threshold: float
    passed: bool
    method: str
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """For the manifest."""
        return asdict(self)


SanityCheck = Callable[[Path, Path, Sequence[Sequence[int]], float], SanityResult]


def sanity_prompts(tokenizer: Any) -> list[list[int]]:
    """Token ids of the check's chat prompts (persona + question + generation prompt)."""
    from legal_eagle.calibration import PERSONA
    from legal_eagle.chat_template import render_ids

    return [render_ids(tokenizer, [{"role": "system", "content": PERSONA},  # type: ignore[list-item]
                                   {"role": "user", "content": q}]) for q in SANITY_QUESTIONS]


def _unpack(packed: Any) -> Any:
    """int32 [rows, cols/8] in AWQ gemm order → int [rows, cols] of 4-bit values (on packed's device)."""
    import torch

    rows, cols8 = packed.shape
    out = torch.empty(rows, cols8, 8, dtype=torch.int32, device=packed.device)
    for i, col in enumerate(AWQ_ORDER):
        out[:, :, col] = (packed >> (4 * i)) & 0xF
    return out.reshape(rows, cols8 * 8)


def dequantize(qweight: Any, qzeros: Any, scales: Any, group_size: int) -> Any:
    """The fp16 weight [out, in] an AWQ (gemm, zero-point) linear layer stands for."""
    import torch

    w = _unpack(qweight)  # [in, out]
    z = _unpack(qzeros).repeat_interleave(group_size, 0)
    s = scales.float().repeat_interleave(group_size, 0)
    return ((w - z).float() * s).t().contiguous().to(torch.float16)


def dequantized_tensors(awq_dir: Path, device: str = "cpu") -> Iterator[tuple[str, Any]]:
    """Each tensor of an AWQ checkpoint, linear layers dequantized back to fp16 weights, one at a time.

    Read and dequantized on ``device`` (on a GPU the 7B model's unpacking takes seconds instead of
    the better part of a minute on CPU); only one layer's temporaries exist at once.
    """
    from safetensors import safe_open

    group = json.loads((awq_dir / "config.json").read_text())["quantization_config"]["group_size"]
    for path in sorted(awq_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt", device=device) as f:
            for name in sorted(f.keys()):
                if name.endswith((".qzeros", ".scales")):
                    continue
                if name.endswith(".qweight"):
                    base = name.removesuffix(".qweight")
                    yield base + ".weight", dequantize(f.get_tensor(name), f.get_tensor(base + ".qzeros"),
                                                       f.get_tensor(base + ".scales"), group)
                else:
                    yield name, f.get_tensor(name)


def dequantized_state(awq_dir: Path, device: str = "cpu") -> dict[str, Any]:
    """All tensors of an AWQ checkpoint with linear layers dequantized back to fp16 weights."""
    return dict(dequantized_tensors(awq_dir, device))


def load_dequantized(model: Any, awq_dir: Path, device: str) -> None:
    """Overwrite ``model``'s weights in place with the dequantized AWQ ones (no second copy of the model).

    Raises:
        ValueError: the AWQ tensors do not cover exactly the model's weights.
    """
    import torch

    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    wanted = {k for k in model.state_dict() if not k.endswith("rotary_emb.inv_freq")}
    seen: set[str] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for name, tensor in dequantized_tensors(awq_dir, device):
            target = params.get(name)
            if target is None or target.shape != tensor.shape:
                unexpected.append(name)
                continue
            target.copy_(tensor.to(target.dtype))
            seen.add(name)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(wanted - seen - tied)
    if unexpected or missing:
        raise ValueError(f"AWQ tensors do not match the fp16 model: missing {missing}, unexpected {unexpected}")


def _top1(model: Any, prompts: Sequence[Sequence[int]], device: str) -> list[Any]:
    """argmax next token at every position of each prompt."""
    import torch

    with torch.no_grad():
        return [model(torch.tensor([list(p)], device=device)).logits[0].argmax(-1).cpu() for p in prompts]


def dequant_agreement_check(fp16_dir: Path, awq_dir: Path, prompts: Sequence[Sequence[int]],
                            threshold: float, device: str | None = None) -> SanityResult:
    """Top-1 agreement of fp16 vs dequantized 4-bit weights in one transformers Llama (CPU or CUDA).

    Args:
        fp16_dir: the fp16 Llama checkpoint that was quantized.
        awq_dir: the AWQ output (transformers-style qweight/qzeros/scales).
        prompts: token-id prompts to score.
        threshold: minimum agreement for ``passed``.
        device: "cpu" or "cuda"; default: cuda when available.

    Returns:
        The agreement figures; one model is held in memory, its weights overwritten in place.
    """
    import torch
    from transformers import LlamaForCausalLM

    start = time.monotonic()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = LlamaForCausalLM.from_pretrained(str(fp16_dir), dtype=dtype, device_map=device)
    model.eval()
    ref = _top1(model, prompts, device)
    load_dequantized(model, awq_dir, device)
    got = _top1(model, prompts, device)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    same = sum(int((a == b).sum()) for a, b in zip(ref, got, strict=True))
    total = sum(len(a) for a in ref)
    last = sum(int(a[-1] == b[-1]) for a, b in zip(ref, got, strict=True)) / len(ref)
    agreement = same / total
    return SanityResult(agreement=agreement, last_token_agreement=last, positions=total, threshold=threshold,
                        passed=agreement >= threshold, method=f"dequantized-awq-vs-fp16 transformers ({device})",
                        seconds=round(time.monotonic() - start, 2))
