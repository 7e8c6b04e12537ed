"""Tiny-model factory: every family loads and generates with mlx_lm, skew works,
HF layout round-trips through sanitize and mlx_lm.convert, presets, CLI."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchGLU

from npumoe_mlx.tools import tiny

PROMPT = "The quick brown fox jumps over the lazy dog."


def _weights(model) -> dict:
    return dict(tree_flatten(model.parameters()))


def _same_weights(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(mx.array_equal(a[k], b[k]).item() for k in a)


@pytest.mark.parametrize("q_bits", [None, 4])
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_family_loads_and_generates(tmp_path, family, q_bits):
    out = tiny.make_tiny_model(tmp_path / "m", family, q_bits=q_bits)
    model, tok, config = mlx_lm.load(str(out), return_config=True)

    # config round-trip: what was written is the factory's config (+ quantization)
    written = json.loads((out / "config.json").read_text())
    expected = tiny.tiny_config(family)
    assert {k: v for k, v in written.items() if not k.startswith("quantization")} == expected
    assert config["model_type"] == written["model_type"]
    if q_bits:
        q = written["quantization"]  # (+ per-layer overrides from the model's quant_predicate)
        assert (q["group_size"], q["bits"], q["mode"]) == (32, 4, "affine")
        assert any(k.endswith(".scales") for k in _weights(model))
    else:
        assert "quantization" not in written
        assert all(v.dtype == mx.float32 for v in _weights(model).values())

    vocab = written.get("text_config", written)["vocab_size"]
    assert tok.has_chat_template and len(tok.vocab) <= vocab
    assert any(isinstance(m, SwitchGLU) for _, m in model.named_modules())

    text = mlx_lm.generate(model, tok, PROMPT, max_tokens=8)
    assert isinstance(text, str)
    logits = model(mx.array([tok.encode(PROMPT)]))
    assert logits.shape[-1] == vocab and mx.isfinite(logits).all().item()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_q8_group64(tmp_path, family):
    out = tiny.make_tiny_model(tmp_path / "m", family, q_bits=8, q_group_size=64)
    model, tok, config = mlx_lm.load(str(out), return_config=True)
    assert config["quantization"]["bits"] == 8 and config["quantization"]["group_size"] == 64
    msgs = [{"role": "user", "content": "hello"}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True)
    mlx_lm.generate(model, tok, prompt, max_tokens=8)
    assert mx.isfinite(model(mx.array([prompt]))).all().item()


def test_weights_deterministic_per_seed():
    a, _ = tiny.build_model("qwen3_moe", seed=1, skew=1.5)
    b, _ = tiny.build_model("qwen3_moe", seed=1, skew=1.5)
    c, _ = tiny.build_model("qwen3_moe", seed=2, skew=1.5)
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert _same_weights(wa, wb)
    assert set(wa) == set(wc)
    for k in ("model.embed_tokens.weight", "model.layers.0.mlp.gate.weight"):
        assert not mx.array_equal(wa[k], wc[k]).item()


def test_tokenizer_deterministic(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    n = tiny.build_tokenizer_files(tmp_path / "a")
    tiny.build_tokenizer_files(tmp_path / "b")
    assert n <= tiny.MODEL_VOCAB
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


class _Record(nn.Module):
    """Wraps a SwitchGLU and records the expert ids of each call."""

    def __init__(self, inner, seen):
        super().__init__()
        self.inner = inner
        self._seen = seen.append

    def __call__(self, x, inds):
        self._seen(np.array(inds).reshape(-1))
        return self.inner(x, inds)


def _top2_share(model, tokens) -> list:
    """Share of routed (token, expert) pairs taken by the 2 busiest experts, per MoE layer."""
    records = []
    for path, mod in list(model.named_modules()):
        if isinstance(mod, SwitchGLU):
            parent_path, name = path.rsplit(".", 1)
            parent = dict(model.named_modules())[parent_path]
            seen = []
            setattr(parent, name, _Record(mod, seen))
            records.append(seen)
    model(mx.array([tokens]))
    shares = []
    for seen in records:
        counts = np.bincount(np.concatenate(seen), minlength=8)
        shares.append(np.sort(counts)[-2:].sum() / counts.sum())
    return shares


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "lfm2_moe"])
def test_skew_makes_hot_experts(family):
    tokens = np.random.default_rng(7).integers(3, 384, 512).tolist()
    flat = _top2_share(tiny.build_model(family, seed=0, skew=0.0)[0], tokens)
    hot = _top2_share(tiny.build_model(family, seed=0, skew=2.0)[0], tokens)
    # 8 experts, top-2: uniform routing puts ~25-30% on the busiest two
    assert max(flat) < 0.42, flat
    assert min(hot) > 0.6, hot
    assert min(hot) > max(flat) + 0.25


@pytest.mark.parametrize("family", tiny.HF_LAYOUT_FAMILIES)
def test_hf_layout_loads_to_same_weights(tmp_path, family):
    mlx_dir = tiny.make_tiny_model(tmp_path / "mlx", family, seed=3, skew=1.0)
    hf_dir = tiny.make_tiny_model(tmp_path / "hf", family, seed=3, skew=1.0, hf_layout=True)
    hf_keys = set(mx.load(str(hf_dir / "model.safetensors")))
    assert not any(".switch_mlp." in k for k in hf_keys)  # really the HF layout
    a, _ = mlx_lm.load(str(mlx_dir))
    b, _ = mlx_lm.load(str(hf_dir))
    assert _same_weights(_weights(a), _weights(b))


def test_hf_layout_key_names(tmp_path):
    out = tiny.make_tiny_model(tmp_path / "mixtral", "mixtral", hf_layout=True)
    keys = set(mx.load(str(out / "model.safetensors")))
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in keys
    out = tiny.make_tiny_model(tmp_path / "qwen3", "qwen3_moe", hf_layout=True)
    keys = set(mx.load(str(out / "model.safetensors")))
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in keys


def test_hf_layout_unsupported_and_quantized(tmp_path):
    for family in tiny.HF_LAYOUT_UNSUPPORTED:
        with pytest.raises(ValueError, match=family):
            tiny.make_tiny_model(tmp_path / family, family, hf_layout=True)
    with pytest.raises(ValueError, match="hf_layout"):
        tiny.make_tiny_model(tmp_path / "q", "mixtral", hf_layout=True, q_bits=4)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_hf_layout_through_mlx_lm_convert(tmp_path, family):
    from mlx_lm import convert

    hf_dir = tiny.make_tiny_model(tmp_path / "hf", family, hf_layout=True)
    ref, _ = mlx_lm.load(str(hf_dir))
    for quantize in (False, True):
        dst = tmp_path / f"converted-{quantize}"
        convert(str(hf_dir), mlx_path=str(dst), quantize=quantize, q_group_size=32)
        model, tok, config = mlx_lm.load(str(dst), return_config=True)
        assert ("quantization" in config) == quantize
        mlx_lm.generate(model, tok, PROMPT, max_tokens=8)
        if not quantize:  # float32 kept (config torch_dtype), so nothing changed
            assert _same_weights(_weights(ref), _weights(model))
        logits = model(mx.array([tok.encode(PROMPT)]))
        assert mx.isfinite(logits).all().item()


def test_shape_preset_qwen3_30b(tmp_path):
    p = tiny.load_shape_presets()["qwen3-30b-a3b"]
    # real dims, one layer, 8 of the 128 experts to keep the float32 file small
    out = tiny.make_tiny_model(tmp_path / "q3", "qwen3_moe", shape="qwen3-30b-a3b",
                               num_layers=1, num_experts=8)
    model, tok, config = mlx_lm.load(str(out), return_config=True)
    assert config["hidden_size"] == p["hidden"] == 2048
    assert config["moe_intermediate_size"] == p["expert_intermediate"]
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (
        p["heads"], p["kv_heads"], p["head_dim"])
    assert config["num_experts_per_tok"] == p["top_k"] and config["num_hidden_layers"] == 1
    assert config["vocab_size"] == tiny.MODEL_VOCAB
    w = _weights(model)
    assert w["model.layers.0.mlp.switch_mlp.gate_proj.weight"].shape == (8, 768, 2048)
    assert w["model.layers.0.mlp.switch_mlp.down_proj.weight"].shape == (8, 2048, 768)
    assert mx.isfinite(model(mx.array([tok.encode("Hello there")]))).all().item()


def test_shape_preset_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown shape preset"):
        tiny.make_tiny_model(tmp_path / "a", "qwen3_moe", shape="nope")
    with pytest.raises(ValueError, match="qwen3_moe"):
        tiny.make_tiny_model(tmp_path / "b", "mixtral", shape="qwen3-30b-a3b")
    with pytest.raises(ValueError, match="head_dim"):  # mlx_lm phimoe: head_dim = hidden // heads
        tiny.make_tiny_model(tmp_path / "c", "phimoe", shape="phi-tiny-moe")
    cfg = tiny.tiny_config("deepseek_v2", shape="deepseek-v2-lite", num_layers=2)
    assert cfg["n_shared_experts"] == 2 and cfg["first_k_dense_replace"] == 1
    assert cfg["num_experts_per_tok"] == 6 and cfg["n_routed_experts"] == 64


def test_overwrite_rules(tmp_path):
    out = tiny.make_tiny_model(tmp_path / "m", "mixtral", seed=0)
    first = (out / "model.safetensors").read_bytes()
    tiny.make_tiny_model(out, "mixtral", seed=1)  # a previous factory output: replaced
    assert (out / "model.safetensors").read_bytes() != first
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        tiny.make_tiny_model(foreign, "mixtral")
    assert (foreign / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    tiny.make_tiny_model(tmp_path / "empty", "olmoe")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "foreign", "m"]  # no temp left


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = tiny.main(["--family", "olmoe", "--out", str(out), "--q-bits", "4", "--skew", "1.5",
                    "--seed", "3", "--layers", "3"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0]
    info = json.loads((out / tiny.MARKER).read_text())
    assert (info["family"], info["q_bits"], info["skew"], info["seed"], info["num_layers"]) == (
        "olmoe", 4, 1.5, 3, 3)
    mlx_lm.load(str(out))

    bad = [
        ["--family", "nope", "--out", str(tmp_path / "x")],
        ["--family", "mixtral", "--out", str(tmp_path / "x"), "--q-bits", "3"],
        ["--family", "mixtral", "--out", str(tmp_path / "x"), "--hf-layout", "--q-bits", "4"],
        ["--family", "mixtral", "--out", str(tmp_path / "x"), "--shape", "nope"],
        ["--family", "mixtral", "--out", str(tmp_path / "x"), "--q-bits", "4", "--q-group-size", "128"],
        ["--out", str(tmp_path / "x")],
    ]
    for argv in bad:
        assert tiny.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error" in err, err
    assert not (tmp_path / "x").exists()
