"""The tiny random checkpoints look like InternLM2-chat's (and Llama's) on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from legal_eagle.tiny_model import BANNER, INTERNLM2_SPECIALS, build_tiny_checkpoint, main


@pytest.fixture(scope="module")
def internlm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "internlm2")


def test_internlm2_layout(internlm2_dir: Path) -> None:
    from safetensors import safe_open

    cfg = json.loads((internlm2_dir / "config.json").read_text())
    assert cfg["architectures"] == ["InternLM2ForCausalLM"] and cfg["model_type"] == "internlm2"
    assert cfg["rope_theta"] == 1000000 and cfg["bias"] is False
    assert not list(internlm2_dir.glob("*.py")), "no remote code is shipped"
    with safe_open(str(internlm2_dir / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        wqkv = f.get_tensor("model.layers.0.attention.wqkv.weight")
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    assert wqkv.shape == ((cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * head_dim,
                          cfg["hidden_size"])
    for name in ("model.tok_embeddings.weight", "output.weight", "model.norm.weight",
                 "model.layers.1.feed_forward.w2.weight", "model.layers.1.ffn_norm.weight"):
        assert name in names
    assert len(names) == 3 + 7 * cfg["num_hidden_layers"]


def test_tokenizer_is_internlm2_like(internlm2_dir: Path) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(internlm2_dir / "tokenizer.model"))
    n = sp.get_piece_size()
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert [sp.id_to_piece(i) for i in range(n - 6, n)] == list(INTERNLM2_SPECIALS)
    text = "房东不退押金怎么办？"
    assert sp.decode(sp.encode(text)) == text
    assert len(sp.encode(text)) < len(text.encode()), "Chinese is not all byte fallback"
    tcfg = json.loads((internlm2_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tcfg["chat_template"] and tcfg["bos_token"] == "<s>"
    assert tcfg["added_tokens_decoder"][str(n - 1)]["content"] == "<|im_start|>"


def test_deterministic_and_sharded(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    a = build_tiny_checkpoint(tmp_path / "a", seed=3)
    b = build_tiny_checkpoint(tmp_path / "b", seed=3, max_shard_bytes=40_000)
    index = json.loads((b / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    merged: dict = {}
    for s in shards:
        merged.update(load_file(str(b / s)))
    ref = load_file(str(a / "model.safetensors"))
    assert merged.keys() == ref.keys()
    assert all((merged[k] == ref[k]).all() for k in ref)
    assert (a / "tokenizer.model").read_bytes() == (b / "tokenizer.model").read_bytes()


def test_rejects_bad_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_kv_heads"):
        build_tiny_checkpoint(tmp_path / "x", num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_checkpoint(tmp_path / "y", vocab_size=10)


def test_cli_llama_says_random(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoTokenizer

    from legal_eagle.chat_template import render_ids
    from tests._checkpoints import CHAT

    assert main([str(tmp_path / "llama"), "--arch", "llama"]) == 0
    assert BANNER in capsys.readouterr().out and "NOT Legal-Eagle" in BANNER
    cfg = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "llama"))
    ref = tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
    ref = list(ref["input_ids"] if not isinstance(ref, list) else ref)
    assert render_ids(tok, CHAT) == ref
