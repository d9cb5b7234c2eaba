"""InternLM2 → Llama conversion of a checkpoint directory, shard by shard.

InternLM2 is Llama with other tensor names and a fused ``wqkv`` whose rows are grouped per
KV head as ``[q heads of the group..., k, v]``; both use the same rotate-half RoPE, so the
split needs no permutation. The result loads in plain ``transformers`` (``LlamaForCausalLM``,
no remote code) and in TurboMind's Llama reader; the tokenizer becomes a self-contained
``tokenizer.json`` built exactly like InternLM2's own fast tokenizer, with the same ids.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, "float | None", str], None]
CONVERSION_MARKER = "legal_eagle_conversion.json"
_RENAMES = {
    "attention.wo.": "self_attn.o_proj.",
    "feed_forward.w1.": "mlp.gate_proj.",
    "feed_forward.w3.": "mlp.up_proj.",
    "feed_forward.w2.": "mlp.down_proj.",
    "attention_norm.": "input_layernorm.",
    "ffn_norm.": "post_attention_layernorm.",
}
_COPIED_FILES = ("generation_config.json", "special_tokens_map.json", "tokenizer.model")


def read_config(model_dir: Path) -> dict[str, Any]:
    """The checkpoint's config.json as a dict."""
    return dict(json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")))


def model_arch(model_dir: Path) -> str:
    """'internlm2', 'llama' or the config's model_type for anything else."""
    cfg = read_config(model_dir)
    arch = " ".join(cfg.get("architectures") or [])
    if cfg.get("model_type") == "internlm2" or "InternLM2" in arch:
        return "internlm2"
    if cfg.get("model_type") == "llama" or "LlamaForCausalLM" in arch:
        return "llama"
    return str(cfg.get("model_type", "unknown"))


def weight_shards(model_dir: Path) -> list[Path]:
    """The weight files of a checkpoint (safetensors preferred), in index order."""
    model_dir = Path(model_dir)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = model_dir / index_name
        if index.is_file():
            names = json.loads(index.read_text())["weight_map"].values()
            return [model_dir / n for n in sorted(set(names))]
        if (model_dir / single).is_file():
            return [model_dir / single]
    return []


def _iter_shard(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (name, tensor) of one shard; memory stays bounded by one shard."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                yield name, f.get_tensor(name)
    else:
        import torch

        try:  # mmap keeps memory at one shard; legacy (non-zip) .bin files cannot be mmapped
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        yield from state.items()


def llama_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Llama config.json content for an InternLM2 config (rope, tie, dtype and ids kept)."""
    from transformers import LlamaConfig

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))}
    scaling = cfg.get("rope_scaling")
    if scaling:
        rope_type = scaling.get("rope_type") or scaling.get("type")
        if rope_type not in ("linear", "dynamic"):
            raise ValueError(f"unsupported InternLM2 rope_scaling type {rope_type!r} (linear or dynamic)")
        rope.update(rope_type=rope_type, factor=float(scaling["factor"]))
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float16"
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    llama = LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=hidden, intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads", heads), head_dim=hidden // heads,
        hidden_act=cfg.get("hidden_act", "silu"),
        max_position_embeddings=cfg.get("max_position_embeddings", 32768),
        initializer_range=cfg.get("initializer_range", 0.02), rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        use_cache=cfg.get("use_cache", True), pad_token_id=cfg.get("pad_token_id"),
        bos_token_id=cfg.get("bos_token_id", 1), eos_token_id=cfg.get("eos_token_id", 2),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope_parameters=rope,
        attention_bias=bool(cfg.get("bias", False)), mlp_bias=False, dtype=dtype,
    )
    out = llama.to_dict()
    out["architectures"] = ["LlamaForCausalLM"]
    out["dtype"] = dtype
    return dict(out)


def split_wqkv(wqkv: Any, num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[Any, Any, Any]:
    """Split InternLM2's fused, GQA-interleaved wqkv (weight or bias) into q, k, v."""
    groups = num_heads // num_kv_heads
    rest = wqkv.shape[1:]
    w = wqkv.reshape(num_kv_heads, groups + 2, head_dim, *rest)
    q = w[:, :groups].reshape(num_heads * head_dim, *rest)
    k = w[:, groups].reshape(num_kv_heads * head_dim, *rest)
    v = w[:, groups + 1].reshape(num_kv_heads * head_dim, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def convert_tensor(name: str, tensor: Any, cfg: dict[str, Any]) -> list[tuple[str, Any]]:
    """Llama (name, tensor) pairs for one InternLM2 tensor; [] for buffers to drop."""
    if name.endswith("rotary_emb.inv_freq"):
        return []
    if name == "model.tok_embeddings.weight":
        return [("model.embed_tokens.weight", tensor)]
    if name == "output.weight":
        return [("lm_head.weight", tensor)]
    if name == "model.norm.weight":
        return [(name, tensor)]
    if name.startswith("model.layers."):
        prefix, _, rest = name.partition(".attention.wqkv.")
        if rest:
            heads = cfg["num_attention_heads"]
            q, k, v = split_wqkv(tensor, heads, cfg.get("num_key_value_heads", heads),
                                 cfg["hidden_size"] // heads)
            return [(f"{prefix}.self_attn.{p}_proj.{rest}", t) for p, t in zip("qkv", (q, k, v), strict=True)]
        for old, new in _RENAMES.items():
            if f".{old}" in name:
                return [(name.replace(f".{old}", f".{new}"), tensor)]
    raise ValueError(f"unexpected InternLM2 tensor {name!r}")


def _convert_weights(src: Path, dst: Path, cfg: dict[str, Any], progress: ProgressFn) -> None:
    """Write Llama safetensors shards, one output shard per input shard, plus an index."""
    from safetensors.torch import save_file

    shards = weight_shards(src)
    if not shards:
        raise FileNotFoundError(f"no weights (*.safetensors / pytorch_model*.bin) in {src}")
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        progress("convert", i / len(shards), f"{shard.name} ({i + 1}/{len(shards)})")
        out_name = ("model.safetensors" if len(shards) == 1
                    else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        out: dict[str, Any] = {}
        for name, tensor in _iter_shard(shard):
            for new_name, new_tensor in convert_tensor(name, tensor, cfg):
                out[new_name] = new_tensor.contiguous()
                weight_map[new_name] = out_name
                total += new_tensor.numel() * new_tensor.element_size()
        save_file(out, str(dst / out_name), metadata={"format": "pt"})
        del out
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    progress("convert", 1.0, "weights done")


def _sp_merges(proto: Any) -> list[tuple[str, str]]:
    """BPE merges of a sentencepiece BPE model, ranked like sentencepiece scores them."""
    normal = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == 1}
    ranked = sorted(normal.items(), key=lambda kv: (-proto.pieces[kv[1]].score, kv[1]))
    merges: list[tuple[str, str]] = []
    for piece, _ in ranked:
        local = [(piece[:j], piece[j:]) for j in range(1, len(piece))
                 if piece[:j] in normal and piece[j:] in normal]
        merges += sorted(local, key=lambda lr: (normal[lr[0]], normal[lr[1]]))
    return merges


def build_fast_tokenizer(sp_model: Path, added: dict[int, dict[str, Any]], add_bos: bool = True) -> Any:
    """A ``tokenizers.Tokenizer`` equal to InternLM2's own fast tokenizer for this tokenizer.model.

    Args:
        sp_model: the sentencepiece BPE model file.
        added: ``added_tokens_decoder`` of tokenizer_config.json (id → {content, special, ...}).
        add_bos: prepend ``<s>`` when encoding with special tokens.

    Returns:
        The tokenizer, ids identical to the sentencepiece model and to the added tokens' ids.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    proto = pb2.ModelProto()  # type: ignore[attr-defined]
    proto.ParseFromString(Path(sp_model).read_bytes())
    if proto.trainer_spec.model_type != 2:
        raise ValueError("InternLM2's tokenizer.model must be a sentencepiece BPE model")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    vocab.update({"<unk>": 0, "<s>": 1, "</s>": 2})
    tok = Tokenizer(BPE(vocab, _sp_merges(proto), unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    norm: list[Any] = []
    spec = proto.normalizer_spec
    if spec.precompiled_charsmap:
        norm.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        norm += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        norm.append(normalizers.Prepend("▁"))
    norm.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(norm)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1 if spec.add_dummy_prefix else 0)])
    tokens = [AddedToken(v["content"], special=bool(v.get("special", True)), normalized=False,
                         lstrip=bool(v.get("lstrip")), rstrip=bool(v.get("rstrip")),
                         single_word=bool(v.get("single_word")))
              for _, v in sorted(added.items())]
    tok.add_special_tokens(tokens)
    for idx, v in added.items():
        if tok.token_to_id(v["content"]) != int(idx):
            raise ValueError(f"added token {v['content']!r}: id {tok.token_to_id(v['content'])} != {idx}")
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)])
    return tok


def check_same_ids(sp_model: Path, tok: Any) -> None:
    """Raise ValueError unless ``tok`` encodes sample Chinese/English text exactly as sentencepiece does."""
    import sentencepiece as spm

    from legal_eagle.tiny_model import sample_text

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    lines = [*sample_text().splitlines(), " 两个  空格\t制表 ", "Mixed 中英 text 123,456.78元", "生僻字𠀀😀"]
    for line in lines:
        want, got = sp.encode(line), tok.encode(line, add_special_tokens=False).ids
        if want != got:
            raise ValueError(f"converted tokenizer differs from tokenizer.model on {line[:30]!r}: {got[:12]} "
                             f"!= {want[:12]}")


def convert_tokenizer(src: Path, dst: Path) -> None:
    """Write a remote-code-free tokenizer (tokenizer.json + config) for an InternLM2 checkpoint."""
    src, dst = Path(src), Path(dst)
    tcfg: dict[str, Any] = {}
    if (src / "tokenizer_config.json").is_file():
        tcfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = {int(k): v for k, v in (tcfg.get("added_tokens_decoder") or {}).items()}
    if (src / "tokenizer.json").is_file():
        shutil.copyfile(src / "tokenizer.json", dst / "tokenizer.json")
    elif (src / "tokenizer.model").is_file():
        tok = build_fast_tokenizer(src / "tokenizer.model", added, bool(tcfg.get("add_bos_token", True)))
        check_same_ids(src / "tokenizer.model", tok)
        tok.save(str(dst / "tokenizer.json"))
    else:
        raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {src}")
    keep = ("added_tokens_decoder", "additional_special_tokens", "bos_token", "eos_token", "unk_token",
            "pad_token", "clean_up_tokenization_spaces", "model_max_length", "chat_template",
            "padding_side")
    out = {k: tcfg[k] for k in keep if k in tcfg}
    out.update({"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False})
    out.setdefault("bos_token", "<s>")
    out.setdefault("eos_token", "</s>")
    out.setdefault("unk_token", "<unk>")
    (dst / "tokenizer_config.json").write_text(json.dumps(out, ensure_ascii=False, indent=2))


@contextmanager
def staged_dir(dst: Path) -> Iterator[Path]:
    """A temp sibling of ``dst`` to write a checkpoint into; renamed to ``dst`` (replacing it) when the
    block ends, removed when it raises: a killed or failed write never leaves a half ``dst``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert_checkpoint(src: Path, dst: Path, *, on_progress: ProgressFn | None = None,
                       marker: dict[str, Any] | None = None) -> Path:
    """Convert an InternLM2 checkpoint directory into a Llama one, published atomically.

    Args:
        src: InternLM2 checkpoint (config.json, safetensors or .bin shards, tokenizer files).
        dst: target directory; written as a temp sibling first, then renamed into place.
        on_progress: ``(stage, fraction or None, detail)`` callback.
        marker: extra entries for ``legal_eagle_conversion.json`` (written before the publish).

    Returns:
        ``dst``.

    Raises:
        ValueError: when ``src`` is not an InternLM2 checkpoint or has unexpected tensors.
    """
    src, dst = Path(src), Path(dst)
    progress = on_progress or (lambda stage, frac, detail: None)
    if model_arch(src) != "internlm2":
        raise ValueError(f"{src} is not an InternLM2 checkpoint (architecture {model_arch(src)})")
    cfg = read_config(src)
    with staged_dir(dst) as tmp:
        (tmp / "config.json").write_text(json.dumps(llama_config(cfg), indent=2))
        for name in _COPIED_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        convert_tokenizer(src, tmp)
        _convert_weights(src, tmp, cfg, progress)
        info = {"source": str(src.resolve()), "from": "internlm2", **(marker or {})}
        (tmp / CONVERSION_MARKER).write_text(json.dumps(info, indent=2))
    logger.info("converted InternLM2 checkpoint %s to Llama layout at %s", src, dst)
    return dst
