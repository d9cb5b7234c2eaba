"""Tiny RANDOM test checkpoints in InternLM2-chat's on-disk format (or Llama's), built in seconds.

The InternLM2 layout mirrors the real InternLM2-chat-7B checkpoint: ``config.json`` with
``InternLM2ForCausalLM``, fused GQA-interleaved ``attention.wqkv`` weights, a sentencepiece
BPE ``tokenizer.model`` (byte fallback) whose last pieces are InternLM2's special tokens
(``<|plugin|>`` ... ``<|im_end|>``, ``<|im_start|>``), and InternLM2's ``chat_template``;
no remote-code ``.py`` files. The weights are random: the model says nothing meaningful.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

Arch = Literal["internlm2", "llama"]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# InternLM2's special pieces, in the order they close its vocabulary (ids 92538..92543 there).
INTERNLM2_SPECIALS = (
    "<|plugin|>",
    "<|interpreter|>",
    "<|action_end|>",
    "<|action_start|>",
    "<|im_end|>",
    "<|im_start|>",
)
BANNER = "RANDOM TEST MODEL (random weights, tiny vocabulary) - NOT Legal-Eagle; for tests only."

_SAMPLE_TEXT = """\
《中华人民共和国民法典》第一百四十三条规定，具备下列条件的民事法律行为有效：行为人具有相应的民事行为能力；
意思表示真实；不违反法律、行政法规的强制性规定，不违背公序良俗。
问：房东不退押金怎么办？答：您好，根据《民法典》第七百零三条，租赁合同是出租人将租赁物交付承租人使用、收益，
承租人支付租金的合同。租赁期满，承租人按约定返还房屋且无损坏的，出租人应当退还押金。建议您先保留租赁合同、
付款凭证、交房照片等证据，与房东协商；协商不成的，可以向房屋所在地人民法院提起诉讼。
问：公司拖欠工资两个月，我可以怎么维权？答：根据《劳动合同法》第三十条，用人单位应当按照劳动合同约定和国家规定，
向劳动者及时足额支付劳动报酬。用人单位拖欠或者未足额支付劳动报酬的，劳动者可以依法向当地人民法院申请支付令。
您也可以向劳动保障监察机构投诉，或者向劳动争议仲裁委员会申请仲裁。依据第三十八条，用人单位未及时足额支付劳动报酬的，
劳动者可以解除劳动合同，并要求支付经济补偿。
问：交通事故对方全责但不赔偿，怎么办？答：依据《道路交通安全法》第七十六条，机动车发生交通事故造成人身伤亡、
财产损失的，由保险公司在机动车第三者责任强制保险责任限额范围内予以赔偿；不足的部分，按照过错承担赔偿责任。
您可以凭交警部门出具的事故认定书向对方及其保险公司索赔，必要时向人民法院起诉，诉讼时效一般为三年。
问：借钱不还只有微信聊天记录可以起诉吗？答：可以。根据《民事诉讼法》第六十六条，证据包括当事人的陈述、书证、
物证、视听资料、电子数据、证人证言、鉴定意见、勘验笔录。微信聊天记录、转账记录属于电子数据，应当保存原始载体。
借款人逾期不还的，出借人可以要求其按照约定支付利息；对支付利息没有约定的，视为没有利息。
问：离婚时房产如何分割？答：根据《民法典》第一千零八十七条，离婚时，夫妻的共同财产由双方协议处理；
协议不成的，由人民法院根据财产的具体情况，按照照顾子女、女方和无过错方权益的原则判决。婚前个人财产归个人所有，
婚后共同还贷部分及其相对应的增值部分，一般由取得房屋所有权的一方对另一方进行补偿。
问：网购买到假货怎么赔偿？答：根据《消费者权益保护法》第五十五条，经营者提供商品或者服务有欺诈行为的，
应当按照消费者的要求增加赔偿其受到的损失，增加赔偿的金额为消费者购买商品的价款或者接受服务的费用的三倍；
增加赔偿的金额不足五百元的，为五百元。《刑法》第一百四十条规定了生产、销售伪劣产品罪。
The Civil Code of the People's Republic of China, Article 1165: liability for fault. 2024年3月15日，
合同金额100000元，违约金20%。Contract law, labor law, 10 days, 30 days, 3 years, 5000 yuan.
"""


def sample_text() -> str:
    """The small built-in Chinese legal text the tiny tokenizer is trained on."""
    return _SAMPLE_TEXT


def _train_sentencepiece(out_file: Path, vocab_size: int, add_dummy_prefix: bool) -> None:
    """Train a tiny byte-fallback BPE sentencepiece model, InternLM2 specials at the end."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb2

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(_SAMPLE_TEXT * 3, encoding="utf-8")
        prefix = str(Path(tmp) / "sp")
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=prefix, model_type="bpe", vocab_size=vocab_size,
            character_coverage=1.0, byte_fallback=True, split_digits=True, hard_vocab_limit=False,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=add_dummy_prefix,
            allow_whitespace_only_pieces=True, user_defined_symbols=list(INTERNLM2_SPECIALS),
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
        )
        proto = pb2.ModelProto()  # type: ignore[attr-defined]
        proto.ParseFromString(Path(prefix + ".model").read_bytes())
    del proto.trainer_spec.input[:]  # temp paths: keep the file deterministic
    proto.trainer_spec.model_prefix = ""
    # sentencepiece puts user-defined symbols right after <unk>/<s>/</s>; InternLM2 has them last.
    pieces = list(proto.pieces)
    specials = [p for p in pieces if p.piece in INTERNLM2_SPECIALS]
    specials.sort(key=lambda p: INTERNLM2_SPECIALS.index(p.piece))
    rest = [p for p in pieces if p.piece not in INTERNLM2_SPECIALS]
    del proto.pieces[:]
    for piece in rest + specials:
        proto.pieces.add().CopyFrom(piece)
    out_file.write_bytes(proto.SerializeToString())


def _internlm2_tokenizer_files(out_dir: Path, sp_vocab_size: int, add_dummy_prefix: bool) -> int:
    """Write tokenizer.model + InternLM2-style tokenizer configs; return the tokenizer's size."""
    import sentencepiece as spm

    _train_sentencepiece(out_dir / "tokenizer.model", sp_vocab_size, add_dummy_prefix)
    sp = spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model"))
    n = sp.get_piece_size()
    decoder: dict[str, dict[str, Any]] = {}
    for piece in ("<unk>", "<s>", "</s>", *INTERNLM2_SPECIALS):
        decoder[str(sp.piece_to_id(piece))] = {
            "content": piece, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
    config = {
        "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(INTERNLM2_SPECIALS),
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "decode_with_prefix_space": False, "model_max_length": 1000000000000000019884624838656,
        "sp_model_kwargs": {}, "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
                   "additional_special_tokens": list(INTERNLM2_SPECIALS)}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    return n


def _internlm2_config(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                      num_kv_heads: int, intermediate_size: int, dtype: str) -> dict[str, Any]:
    """config.json in InternLM2-chat-7B's form (no auto_map: no remote code is shipped)."""
    return {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
        "vocab_size": vocab_size, "hidden_size": hidden_size, "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads, "hidden_act": "silu", "max_position_embeddings": 32768,
        "initializer_range": 0.02, "rms_norm_eps": 1e-5, "use_cache": True, "bias": False,
        "rope_theta": 1000000, "rope_scaling": None, "attn_implementation": "eager",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": False,
        "torch_dtype": dtype, "transformers_version": "4.37.1",
    }


def _random_tensors(cfg: dict[str, Any], seed: int, dtype: Any, device: str) -> Any:
    """Yield (name, tensor) of random InternLM2 weights, layer by layer (bounded memory)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = hidden // heads

    def rand(*shape: int, std: float) -> Any:
        return (torch.randn(*shape, generator=gen, device=device) * std).to(dtype)

    def norm() -> Any:
        return (1.0 + 0.1 * torch.randn(hidden, generator=gen, device=device)).to(dtype)

    yield "model.tok_embeddings.weight", rand(cfg["vocab_size"], hidden, std=1.0)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "attention.wqkv.weight", rand((heads + 2 * kv) * head_dim, hidden, std=hidden**-0.5)
        yield p + "attention.wo.weight", rand(hidden, heads * head_dim, std=hidden**-0.5)
        yield p + "feed_forward.w1.weight", rand(inter, hidden, std=hidden**-0.5)
        yield p + "feed_forward.w3.weight", rand(inter, hidden, std=hidden**-0.5)
        yield p + "feed_forward.w2.weight", rand(hidden, inter, std=inter**-0.5)
        yield p + "attention_norm.weight", norm()
        yield p + "ffn_norm.weight", norm()
    yield "model.norm.weight", norm()
    yield "output.weight", rand(cfg["vocab_size"], hidden, std=hidden**-0.5)


def write_sharded(out_dir: Path, tensors: Any, max_shard_bytes: int) -> list[str]:
    """Save (name, tensor) pairs as safetensors shards (+ index when more than one).

    Args:
        out_dir: the checkpoint directory.
        tensors: an iterable of (name, tensor); consumed once, a shard at a time.
        max_shard_bytes: start a new shard when the current one would grow past this.

    Returns:
        The shard file names written.
    """
    from safetensors.torch import save_file

    shard: dict[str, Any] = {}
    weight_map: dict[str, int] = {}
    size = total = 0
    names: list[str] = []

    def flush() -> None:
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file({k: v.contiguous().cpu() for k, v in shard.items()}, str(out_dir / name),
                  metadata={"format": "pt"})
        names.append(name)
        shard.clear()

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = tensor
        weight_map[name] = len(names)
        size += nbytes
        total += nbytes
    flush()
    if len(names) == 1:
        (out_dir / names[0]).rename(out_dir / "model.safetensors")
        return ["model.safetensors"]
    count = len(names)
    final = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    for old, new in zip(names, final, strict=True):
        (out_dir / old).rename(out_dir / new)
    index = {"metadata": {"total_size": total},
             "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return final


def build_tiny_checkpoint(
    out_dir: Path,
    *,
    arch: Arch = "internlm2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
    dtype: str = "float16",
    vocab_size: int | None = None,
    device: str = "cpu",
    max_shard_bytes: int = 5 * 1024**3,
    add_dummy_prefix: bool = True,
) -> Path:
    """Write a random checkpoint in InternLM2-chat's format (or, converted, in Llama's).

    Args:
        out_dir: target directory (created; existing files with the same names are replaced).
        arch: "internlm2" (fused wqkv, InternLM2 names, sentencepiece tokenizer) or "llama"
            (the same model passed through ``legal_eagle.convert.convert_checkpoint``).
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: the shape.
        seed: weight seed (the tokenizer is deterministic).
        dtype: "float16", "bfloat16" or "float32".
        vocab_size: embedding rows; default: the tokenizer's size rounded up to 64. Must be at
            least the tokenizer's size (92544 gives InternLM2-7B's shape).
        device: where to draw the random numbers ("cuda" makes the 7B shape fast).
        max_shard_bytes: safetensors shard size; more than one shard adds an index file.
        add_dummy_prefix: the sentencepiece flag (a leading "▁" before each text segment).

    Returns:
        ``out_dir``.
    """
    import torch

    if arch not in ("internlm2", "llama"):
        raise ValueError(f"arch must be 'internlm2' or 'llama', not {arch!r}")
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"dtype must be float16, bfloat16 or float32, not {dtype!r}")
    if num_heads % num_kv_heads or hidden_size % num_heads:
        raise ValueError("num_heads must divide hidden_size and be a multiple of num_kv_heads")
    out_dir = Path(out_dir)
    if arch == "llama":
        from legal_eagle.convert import convert_checkpoint

        with tempfile.TemporaryDirectory(dir=out_dir.parent if out_dir.parent.exists() else None) as tmp:
            src = build_tiny_checkpoint(
                Path(tmp) / "internlm2", hidden_size=hidden_size, num_layers=num_layers,
                num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                seed=seed, dtype=dtype, vocab_size=vocab_size, device=device,
                max_shard_bytes=max_shard_bytes, add_dummy_prefix=add_dummy_prefix,
            )
            if out_dir.exists():
                shutil.rmtree(out_dir)
            convert_checkpoint(src, out_dir)
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    n_tok = _internlm2_tokenizer_files(out_dir, 700, add_dummy_prefix)
    vocab = vocab_size if vocab_size is not None else math.ceil(n_tok / 64) * 64
    if vocab < n_tok:
        raise ValueError(f"vocab_size must be >= {n_tok} (the tokenizer's size), got {vocab}")
    cfg = _internlm2_config(vocab, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size,
                            dtype)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    gen_cfg = {"bos_token_id": 1, "eos_token_id": [2, n_tok - 2], "pad_token_id": 2}  # </s>, <|im_end|>
    (out_dir / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    with torch.no_grad():
        write_sharded(out_dir, _random_tensors(cfg, seed, getattr(torch, dtype), device), max_shard_bytes)
    logger.info("%s written to %s", BANNER, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m legal_eagle.tiny_model OUT_DIR [--arch internlm2|llama] ...``."""
    parser = argparse.ArgumentParser(description="Write a tiny RANDOM test checkpoint (not Legal-Eagle).")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--arch", choices=["internlm2", "llama"], default="internlm2")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    print(BANNER)
    path = build_tiny_checkpoint(
        args.out_dir, arch=args.arch, hidden_size=args.hidden_size, num_layers=args.num_layers,
        num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, intermediate_size=args.intermediate_size,
        seed=args.seed, dtype=args.dtype, vocab_size=args.vocab_size, device=args.device,
    )
    print(f"{BANNER}\nwritten: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
