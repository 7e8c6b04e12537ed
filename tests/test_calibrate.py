"""Workloads, fingerprint and calibration profiles on tiny offline models."""

import json
import os
import shutil
import struct

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.switch_layers import SwitchGLU

from npumoe_mlx.build import calibrate as cal
from npumoe_mlx.build import host_ffn
from npumoe_mlx.build import workloads
from npumoe_mlx.bundle.fingerprint import model_fingerprint
from npumoe_mlx.runtime import experts
from npumoe_mlx.tools.tiny import make_tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{skew: (path, model, tokenizer, config)} for a float32 qwen3_moe with 16 experts."""
    root = tmp_path_factory.mktemp("calib")
    out = {}
    for skew in (0.0, 2.0):
        path = make_tiny_model(root / f"skew{skew:g}", "qwen3_moe", skew=skew, seed=3, num_experts=16)
        model, tok, config = mlx_lm.load(str(path), return_config=True)
        out[skew] = (path, model, tok, config)
    return out


# ---------------------------------------------------------------------------
# workloads


@pytest.mark.parametrize("name", sorted(workloads.BUILTIN))
def test_builtin_deterministic_per_seed(name):
    gen = workloads.BUILTIN[name]
    a, b, c = gen(400, 0), gen(400, 0), gen(400, 1)
    assert a == b and a != c
    assert 400 * 3 <= len(a) <= 400 * 6  # ~4 characters per token
    assert len(gen(2000, 0)) > 4 * len(a)


def test_long_context_has_needle_and_question():
    text = workloads.long_context(1000, seed=7)
    assert text.rstrip().endswith("Answer:")
    q = text.rsplit("Question: What is the secret number of the ", 1)[1].split("?")[0]
    assert f"the secret number of the {q} is " in text.rsplit("Question:", 1)[0]


def test_load_corpus_files(tmp_path):
    txt = tmp_path / "doc.txt"
    txt.write_text("one whole document\nwith two lines\n")
    assert workloads.load_corpus_file(txt) == ["one whole document\nwith two lines\n"]
    jl = tmp_path / "data.jsonl"
    rows = [
        {"text": "plain text"},
        {"prompt": "Q: 2+2?", "completion": " 4"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert workloads.load_corpus_file(jl) == ["plain text", "Q: 2+2? 4", "hi\nhello"]
    docs, desc = workloads.corpus_documents(["qa", str(jl), "code"], 600, seed=2)
    assert len(docs) == 5 and docs[0] == workloads.few_shot_qa(300, 2) and docs[4] == workloads.code_like(300, 2)
    assert "qa(seed=2" in desc and "data.jsonl (3 docs)" in desc


def test_bad_corpus_inputs(tmp_path):
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"text": "ok"}\n{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        workloads.load_corpus_file(jl)
    jl.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: expected a 'text'"):
        workloads.load_corpus_file(jl)
    with pytest.raises(ValueError, match="unknown corpus 'wiki'"):
        workloads.corpus_documents(["wiki"], 100, 0)
    with pytest.raises(ValueError, match="expected a .txt or .jsonl"):
        workloads.load_corpus_file(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="cannot read corpus file"):
        workloads.load_corpus_file(tmp_path / "missing.txt")


def test_prompt_of_tokens_exact(models):
    tok = models[0.0][2]
    for n in (1, 7, 64, 700):
        ids = workloads.prompt_of_tokens(tok, n, seed=4)
        assert len(ids) == n
    ids = workloads.prompt_of_tokens(tok, 700, seed=4)
    assert ids == workloads.prompt_of_tokens(tok, 700, seed=4)
    assert ids != workloads.prompt_of_tokens(tok, 700, seed=5)
    text = tok.decode(ids)
    assert text.endswith("Answer:") and "Remember this: the secret number" in text


# ---------------------------------------------------------------------------
# calibration


def _block(model):
    return model.model.layers[0].mlp.switch_mlp


def test_calibration_counts_and_model_stays_stock(models):
    path, model, tok, config = models[0.0]
    probe = mx.array([tok.encode("The quick brown fox jumps over the lazy dog.")])
    want = model(probe)
    docs = [workloads.long_context(200, 0), workloads.code_like(150, 1)]
    full = [len(tok.encode(d)) for d in docs]
    prof = cal.calibrate(model, tok, config, docs, chunk_size=128, max_tokens=600, model_path=path)
    # each document shrunk in proportion (to within a token's rounding) so that they sum to 600
    lengths = [sum(c["tokens"] for c in prof.layers[0].chunks if c["seq"] == i) for i in range(len(docs))]
    assert sum(full) > 600 and all(abs(n - f * 600 / sum(full)) < 1 for n, f in zip(lengths, full))
    assert prof.tokens == sum(lengths) == 600 and prof.chunk_size == 128
    assert len(prof.layers) == len(experts.find_expert_blocks(model, config)) == 2
    expect_chunks = [min(128, n - s) for n in lengths for s in range(0, n, 128)]
    for l in prof.layers:
        assert (l.num_experts, l.top_k) == (16, 2)
        assert sum(l.counts) == prof.tokens * l.top_k
        assert [c["tokens"] for c in l.chunks] == expect_chunks
        assert np.sum([c["counts"] for c in l.chunks], axis=0).tolist() == l.counts
        assert all(sum(c["counts"]) == c["tokens"] * l.top_k for c in l.chunks)
    assert prof.model_fingerprint == model_fingerprint(path)
    assert type(_block(model)) is SwitchGLU and not experts.installed_blocks(model)
    assert mx.array_equal(model(probe), want).item()


@pytest.mark.parametrize("host", [False, True])
def test_recorder_removed_on_error(models, monkeypatch, host):
    _, model, tok, config = models[0.0]
    with pytest.raises(ValueError, match="chunk size"):
        cal.calibrate(model, tok, config, ["x"], chunk_size=0)

    def boom(module, x, inds, *rest):
        raise RuntimeError("boom")

    monkeypatch.setattr(host_ffn, "experts_ffn", boom) if host else monkeypatch.setattr(experts, "stock_experts", boom)
    with pytest.raises(RuntimeError, match="boom"):
        cal.calibrate(model, tok, config, ["some text"], chunk_size=4, host=host)
    assert type(_block(model)) is SwitchGLU and not experts.installed_blocks(model)


def test_no_moe_blocks():
    from mlx_lm.models import llama

    args = llama.ModelArgs(
        model_type="llama", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
        num_attention_heads=2, rms_norm_eps=1e-6, vocab_size=64, num_key_value_heads=2,
    )
    with pytest.raises(ValueError, match="no MoE expert blocks"):
        cal.calibrate(llama.Model(args), None, {"model_type": "llama"}, ["x"])


def test_skew_and_rank_correlation(models):
    shares, profiles = {}, {}
    for skew in (0.0, 2.0):
        _, model, tok, config = models[skew]
        docs, desc = workloads.corpus_documents(["long-context"], 1024, seed=0)
        profiles[skew] = cal.calibrate(model, tok, config, docs, chunk_size=512, max_tokens=1024, description=desc)
        shares[skew] = np.mean([cal.skew(l)["top10_share"] for l in profiles[skew].layers])
    assert shares[2.0] > shares[0.0] + 0.15, shares
    _, model, tok, config = models[2.0]
    docs, _ = workloads.corpus_documents(["qa", "code"], 1024, seed=1)
    other = cal.calibrate(model, tok, config, docs, chunk_size=512, max_tokens=1024)
    rho = cal.rank_correlation(profiles[2.0], other)
    assert sorted(rho) == [l.layer for l in other.layers]
    assert all(-1.0 <= r <= 1.0 for r in rho.values())
    assert np.mean(list(rho.values())) > 0.5, rho


def test_skew_and_spearman_numbers():
    s = cal.skew({"counts": [10] * 20})
    assert s["top10_share"] == pytest.approx(0.1) and s["gini"] == pytest.approx(0.0)
    s = cal.skew({"counts": [0, 0, 0, 40]})
    assert s["top10_share"] == s["top1_share"] == 1.0 and s["max_over_mean"] == 4.0
    assert cal.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert cal.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert cal.spearman([1, 1, 2, 3], [5, 6, 7, 8]) == pytest.approx(np.corrcoef([1.5, 1.5, 3, 4], [1, 2, 3, 4])[0, 1])


# ---------------------------------------------------------------------------
# fingerprint, profile files, CLI


def test_fingerprint_tracks_weight_bytes(models, tmp_path):
    path = models[0.0][0]
    fp = model_fingerprint(path)
    assert fp == model_fingerprint(path) and len(fp) == 64
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    assert model_fingerprint(copy) == fp
    st = copy / "model.safetensors"
    raw = bytearray(st.read_bytes())
    (n_header,) = struct.unpack("<Q", bytes(raw[:8]))
    pos = 8 + n_header + (len(raw) - 8 - n_header) // 2  # mid tensor data
    raw[pos] ^= 0x01
    st.write_bytes(bytes(raw))
    assert model_fingerprint(copy) != fp


def test_fingerprint_samples_large_files(models, tmp_path, monkeypatch):
    import npumoe_mlx.bundle.fingerprint as fpm

    monkeypatch.setattr(fpm, "FULL_HASH_BYTES", 0)
    monkeypatch.setattr(fpm, "SAMPLE_BYTES", 1024)
    copy = tmp_path / "copy"
    shutil.copytree(models[0.0][0], copy)
    st = copy / "model.safetensors"
    raw = bytearray(st.read_bytes())
    (n_header,) = struct.unpack("<Q", bytes(raw[:8]))
    start, data = 8 + n_header, len(raw) - 8 - n_header
    assert data > 16 * 1024
    fp = fpm.model_fingerprint(copy)
    step = (data - 1024) / 15
    raw[start + int(5 * step) + 100] ^= 0x01  # inside the 6th sample
    st.write_bytes(bytes(raw))
    fp2 = fpm.model_fingerprint(copy)
    assert fp2 != fp
    raw[start + int(5 * step) + 2000] ^= 0x01  # between samples: by design not seen
    st.write_bytes(bytes(raw))
    assert fpm.model_fingerprint(copy) == fp2


def _small_profile():
    layer = cal.LayerCounts(1, "model.layers.1.mlp.switch_mlp", 4, 2, [3, 1, 0, 2],
                            [{"tokens": 2, "counts": [2, 1, 0, 1]}, {"tokens": 1, "counts": [1, 0, 0, 1]}])
    return cal.Profile("ab" * 32, "qwen3_moe", "qa(seed=0)", 3, 2, [layer])


def test_profile_round_trip_and_corrupt(tmp_path):
    prof = _small_profile()
    path = tmp_path / "sub" / "profile.json"
    prof.save(path)
    assert cal.Profile.load(path) == prof
    assert json.loads(path.read_text())["kind"] == "npumoe-profile"
    assert [p.name for p in path.parent.iterdir()] == ["profile.json"]  # no temp left behind

    path.write_text(path.read_text()[:-10])
    with pytest.raises(ValueError, match="not a valid npumoe profile: bad JSON"):
        cal.Profile.load(path)
    obj = prof.to_dict()
    obj["layers"][0]["counts"] = [3, 1, 0]
    path.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match=r"layers\[0\]: 'counts' must be 4"):
        cal.Profile.load(path)
    obj = prof.to_dict()
    obj["layers"][0]["chunks"][0]["counts"] = [0, 0, 0, 0]
    path.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match="do not add up"):
        cal.Profile.load(path)
    path.write_text(json.dumps({**prof.to_dict(), "format": 9}))
    with pytest.raises(ValueError, match="unsupported format 9"):
        cal.Profile.load(path)
    with pytest.raises(ValueError, match="cannot read profile"):
        cal.Profile.load(tmp_path / "missing.json")


def test_cli_writes_profile_and_table(models, tmp_path, capsys):
    path = models[2.0][0]
    out = tmp_path / "p.json"
    rc = cal.main(["--model", str(path), "--corpus", "qa", "--tokens", "300", "--chunk-size", "128",
                   "--out", str(out), "--compare-corpus", "code"])
    assert rc == 0
    prof = cal.Profile.load(out)
    assert prof.tokens == 300 and prof.model_fingerprint == model_fingerprint(path)
    text = capsys.readouterr().out
    assert "top-10% share" in text and "top-1 share" in text and "rank correlation" in text
    assert str(out) in text
    with pytest.raises(ValueError, match="unknown corpus 'nope'"):
        cal.main(["--model", str(path), "--corpus", "nope"])


def test_cli_default_out_in_model_folder(models, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(models[0.0][0], copy)
    assert cal.main(["--model", str(copy), "--tokens", "64"]) == 0
    assert cal.Profile.load(copy / "npumoe-profile.json").tokens == 64


def test_calibration_prints_no_long_sequence_warning(tmp_path):
    """Issue 24: `npumoe calibrate` printed transformers' "Token indices sequence length is longer than
    the specified maximum sequence length" for documents it prefills in chunks anyway."""
    import logging

    class Seen(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())

    said, seen = [], Seen()
    logging.getLogger("transformers").addHandler(seen)  # transformers' own handler writes wherever stderr was
    try:
        path = make_tiny_model(tmp_path / "m", "qwen3_moe", seed=3, num_experts=16)
        model, tok, config = mlx_lm.load(str(path), return_config=True)
        tok.model_max_length = 32  # (set on the wrapped tokenizer) every calibration document is longer than this
        docs, _ = workloads.corpus_documents(["qa"], 256, 0)
        prof = cal.calibrate(model, tok, config, docs, chunk_size=64, max_tokens=256)
        assert prof.tokens > 32
        assert not [m for m in said if "sequence length is longer" in m]
        tok.encode(" ".join(docs))  # the caller's own long input still gets transformers' warning
        assert [m for m in said if "sequence length is longer" in m]
    finally:
        logging.getLogger("transformers").removeHandler(seen)
