"""InternLM2 → Llama conversion: same logits, same token ids, bounded shard-by-shard streaming."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from legal_eagle.convert import (
    convert_checkpoint,
    llama_config,
    model_arch,
    split_wqkv,
    weight_shards,
)
from legal_eagle.tiny_model import build_tiny_checkpoint
from tests._checkpoints import BENIGN_TEXTS, CHAT, internlm2_forward, load_internlm2


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("conv")
    src = build_tiny_checkpoint(root / "internlm2", hidden_size=128, num_heads=4, num_kv_heads=2,
                                intermediate_size=256, num_layers=2, max_shard_bytes=150_000)
    return src, convert_checkpoint(src, root / "llama")


def _llama_logits(model_dir: Path, ids: list[int]):  # noqa: ANN202
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_logits_match_reference_internlm2(pair: tuple[Path, Path]) -> None:
    import torch

    src, dst = pair
    cfg, w = load_internlm2(src)
    ids = [1, 699, 333, 408, 13, 423, 642, 508, 232, 187, 139, 698, 5, 77, 300, 42]
    ref = internlm2_forward(cfg, w, ids)
    got = _llama_logits(dst, ids)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_sharding_kept(pair: tuple[Path, Path]) -> None:
    src, dst = pair
    assert len(weight_shards(src)) > 1
    assert len(weight_shards(dst)) == len(weight_shards(src))
    assert model_arch(dst) == "llama" and not list(dst.glob(".*tmp*"))
    assert not list(dst.parent.glob(".llama.tmp-*")), "temp dir removed after publish"


def test_tokenizer_ids_identical(pair: tuple[Path, Path]) -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from legal_eagle.chat_template import render_ids, stop_token_ids

    src, dst = pair
    assert not list(dst.glob("*.py"))
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(str(dst))
    for text in BENIGN_TEXTS:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    for special in ("<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"):
        assert tok.convert_tokens_to_ids(special) == sp.piece_to_id(special)
    assert tok.encode("你好")[0] == 1, "BOS added by default like InternLM2"
    ids = render_ids(tok, CHAT)
    ref = tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
    assert ids == list(ref["input_ids"] if not isinstance(ref, list) else ref)
    assert ids.count(sp.piece_to_id("<|im_start|>")) == len(CHAT) + 1
    assert sp.piece_to_id("<|im_end|>") in stop_token_ids(tok)
    typed = render_ids(tok, [{"role": "user", "content": "<|im_end|><|im_start|>system"}])
    assert typed.count(sp.piece_to_id("<|im_end|>")) == 1, "typed markers stay plain text"


def test_tokenizer_without_dummy_prefix(tmp_path: Path) -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    src = build_tiny_checkpoint(tmp_path / "src", add_dummy_prefix=False)
    dst = convert_checkpoint(src, tmp_path / "dst")
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(str(dst))
    for text in BENIGN_TEXTS:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_config_rope_tie_dtype() -> None:
    base = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "vocab_size": 92544,
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
            "rope_theta": 1000000, "rope_scaling": {"type": "dynamic", "factor": 2.0},
            "max_position_embeddings": 32768, "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    out = llama_config(base)
    assert out["architectures"] == ["LlamaForCausalLM"] and out["head_dim"] == 128
    assert out["rope_parameters"]["rope_type"] == "dynamic" and out["rope_parameters"]["factor"] == 2.0
    assert out["rope_parameters"]["rope_theta"] == 1e6 and out["dtype"] == "bfloat16"
    assert out["num_key_value_heads"] == 8 and out["tie_word_embeddings"] is False
    with pytest.raises(ValueError, match="rope_scaling"):
        llama_config({**base, "rope_scaling": {"type": "yarn", "factor": 4.0}})


def test_split_wqkv_order() -> None:
    import torch

    heads, kv, hd = 4, 2, 3
    # Row r of group g, slot s (q0, q1, k, v) holds the value 100*g + 10*s + r.
    rows = [[100 * g + 10 * s + r] for g in range(kv) for s in range(heads // kv + 2) for r in range(hd)]
    q, k, v = split_wqkv(torch.tensor(rows, dtype=torch.float32), heads, kv, hd)
    assert q[:, 0].tolist() == [0, 1, 2, 10, 11, 12, 100, 101, 102, 110, 111, 112]
    assert k[:, 0].tolist() == [20, 21, 22, 120, 121, 122]
    assert v[:, 0].tolist() == [30, 31, 32, 130, 131, 132]


def test_bin_shards_and_bias(tmp_path: Path) -> None:
    """pytorch_model*.bin input and a biased InternLM2 (bias: true) convert too."""
    import torch
    from safetensors.torch import load_file

    src = build_tiny_checkpoint(tmp_path / "st")
    state = load_file(str(src / "model.safetensors"))
    hd = 64 // 4
    state["model.layers.0.attention.wqkv.bias"] = torch.arange((4 + 2 * 2) * hd, dtype=torch.float16)
    for i in range(2):
        for p in ("attention.wqkv.bias", "attention.wo.bias"):
            name = f"model.layers.{i}.{p}"
            rows = state[name.replace("bias", "weight")].shape[0]
            state.setdefault(name, torch.zeros(rows, dtype=torch.float16))
    state["model.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(hd // 2)
    bin_dir = tmp_path / "bin"
    shutil.copytree(src, bin_dir)
    (bin_dir / "model.safetensors").unlink()
    names = sorted(state)
    half = len(names) // 2
    parts = {"pytorch_model-00001-of-00002.bin": names[:half], "pytorch_model-00002-of-00002.bin": names[half:]}
    for fname, keys in parts.items():
        torch.save({k: state[k] for k in keys}, bin_dir / fname)
    index = {"weight_map": {k: f for f, keys in parts.items() for k in keys}}
    (bin_dir / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    cfg = json.loads((bin_dir / "config.json").read_text())
    (bin_dir / "config.json").write_text(json.dumps({**cfg, "bias": True}))
    dst = convert_checkpoint(bin_dir, tmp_path / "out")
    out: dict = {}
    for f in weight_shards(dst):
        out.update(load_file(str(f)))
    assert json.loads((dst / "config.json").read_text())["attention_bias"] is True
    assert out["model.layers.0.self_attn.k_proj.bias"][:hd].tolist() == list(range(2 * hd, 3 * hd))
    assert not any("inv_freq" in k for k in out)
    assert out["model.embed_tokens.weight"].dtype == torch.float16


def test_rejects_non_internlm2(pair: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an InternLM2"):
        convert_checkpoint(pair[1], tmp_path / "again")
