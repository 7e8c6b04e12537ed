"""Offline tiny-model factory: random MoE checkpoints that ``mlx_lm.load`` reads.

Tests, the demo and the benchmarks need real mlx_lm MoE models without a model
hub. ``make_tiny_model`` instantiates mlx_lm's own model class for a family with
a tiny config (hidden 64, experts 8, top-k 2, a few layers), fills it with
seeded random weights, optionally quantizes it the way ``mlx_lm.convert`` does,
and writes it next to a locally trained byte-level BPE tokenizer.

Output folder (written atomically):

- ``config.json``, ``model.safetensors`` (+ index), ``tokenizer.json``,
  ``tokenizer_config.json``, ``special_tokens_map.json``
- ``npumoe_tiny.json``: the factory arguments. ``out`` may be overwritten only if
  it is empty or holds this marker (a previous factory output); any other
  non-empty folder is refused.

Knobs:

- ``skew``: router popularity. Embedding rows share a direction ``u``, so the
  stream every router sees has a common component; each router is calibrated
  so that component adds ``skew * log_pop[e]`` to expert e's logit (Zipf
  ranking, different per layer) on top of unit-std per-token logits. With 8
  experts and top-2, the 2 hottest take ~30% of routed pairs at skew 0, ~58% at
  skew 1 and ~78% at skew 2 (see ``_init_weights``).
- ``shape``: a preset from ``data/model-shapes.json``: real expert/attention
  dims, but ``num_layers`` layers (default 2) and the small tokenizer-sized vocab
  (a real vocab only inflates the embedding and lm_head). ``num_experts`` can
  shrink the expert count to keep float32 checkpoints small.
- ``hf_layout``: write the Hugging Face layout (per-expert tensors, or the
  fused expert tensors the family's real checkpoints use) so ``mlx_lm.load`` /
  ``mlx_lm.convert`` exercise the family's ``sanitize``. Built as the exact
  inverse of ``Model.sanitize`` and checked against it before writing.
  Supported for every family in ``FAMILIES`` except those in
  ``HF_LAYOUT_UNSUPPORTED``: gpt_oss (mlx_lm's sanitize only unpacks the MXFP4
  ``*_blocks`` checkpoint format; a float ``gate_up_proj`` comes out under a key
  the model does not have).

Unquantized checkpoints are float32: MLX's CPU ``gather_mm`` is float32 only.

Layer layouts (default layer counts in ``_DEFAULT_LAYERS``, else 2):
deepseek_v2/v3, glm4_moe, dots1, ernie4_5_moe, bailing_moe: first layer dense,
then MoE; llama4: 4 layers, MoE every 2nd (top-1 routing, which mlx_lm's llama4
asserts; it also needs >= 4 layers); jamba: mamba + MoE, attention + dense MLP
alternating; lfm2_moe: 3 layers, conv + dense, attention + MoE, conv + MoE;
gpt_oss: sliding / full attention alternating (>= 2 layers); the rest: all MoE.
Shared experts where the family has them (qwen2_moe, deepseek, glm4_moe, dots1,
bailing_moe, hunyuan, llama4, ernie4_5_moe).
"""

import contextlib
import io
import json
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import SwitchGLU
from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..atomic import honour_umask
from ..bundle import owned
from ..cli.replay import load_shape_presets
from .report import ArgError, Parser

FAMILIES = (
    "mixtral",
    "phimoe",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "gpt_oss",
    "granitemoe",
    "llama4",
    "glm4_moe",
    "ernie4_5_moe",
    "hunyuan",
    "minimax",
    "jamba",
    "dots1",
    "lfm2_moe",
    "bailing_moe",
)

HF_LAYOUT_UNSUPPORTED = {
    "gpt_oss": "mlx_lm's gpt_oss sanitize only unpacks the MXFP4 '*_blocks' expert "
    "tensors of the real checkpoints; float fused experts would load under keys the "
    "model does not have",
}

MARKER = "npumoe_tiny.json"
TOKENIZER_VOCAB = 384  # BPE vocab incl. 256 byte symbols and the special tokens
MODEL_VOCAB = 512  # >= TOKENIZER_VOCAB: MLX embedding lookups do not bounds-check
BOS, EOS, PAD = "<s>", "</s>", "<pad>"

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Training text for the tokenizer; any fixed text works, this one covers
# ordinary prose, numbers, code and chat markers.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A mixture of experts model sends each
token to a few experts chosen by a router. Most experts are cold; a few are hot.
Hello! How are you today? I am fine, thank you. What is the weather like? It is
sunny and warm, with a light breeze from the west. Tomorrow it may rain.
Once upon a time there was a small model that wanted to run on a neural engine.
It counted its tokens: one, two, three, four, five, six, seven, eight, nine, ten.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1024 2048 4096 3.14 2.718.
def forward(x, inds):
    y = experts(x, inds)
    return (y * scores[..., None]).sum(axis=-2)
for i in range(10):
    print(i, i * i)
<|user|>
Write a short poem about the sea.
<|assistant|>
The sea is wide, the sea is deep, it sings the sailors off to sleep.
<|system|>
You are a helpful assistant. Answer briefly and clearly.
Apple Silicon has a CPU, a GPU and a Neural Engine. Static shapes run fast there;
dynamic routing stays on the GPU. Calibration counts tokens per expert and layer.
The planner groups experts and picks capacity tiers; overflow is never dropped.
"""


# ---------------------------------------------------------------------------
# Tokenizer


def build_tokenizer_files(out: Path) -> int:
    """Train a byte-level BPE on the built-in text and write HF tokenizer files.

    Returns the tokenizer size. Deterministic: the same text and trainer settings
    give the same merges.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.strip().splitlines(), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return tok.get_vocab_size()


# ---------------------------------------------------------------------------
# Configs


@dataclass
class Dims:
    """Model dims a family config is built from (tiny defaults, or a preset's)."""

    hidden: int = 64
    moe_inter: int = 64  # per-expert FFN width
    dense_inter: int = 128  # dense FFN width (dense layers)
    shared_inter: int = 64  # width of one shared expert
    n_shared: int = 1
    experts: int = 8
    top_k: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    layers: int = 2
    first_dense: int = 1  # dense leading layers, for families that have them
    vocab: int = MODEL_VOCAB


def _base(d: Dims, model_type: str, arch: str) -> dict:
    return {
        "model_type": model_type,
        "architectures": [arch],
        "torch_dtype": "float32",
        "vocab_size": d.vocab,
        "hidden_size": d.hidden,
        "num_hidden_layers": d.layers,
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
    }


def _n_dense(d: Dims) -> int:
    """Leading dense layers, keeping at least one MoE layer."""
    return max(0, min(d.first_dense, d.layers - 1))


def _cfg_mixtral(d):
    return {
        **_base(d, "mixtral", "MixtralForCausalLM"),
        "intermediate_size": d.moe_inter,
        "num_local_experts": d.experts,
        "num_experts_per_tok": d.top_k,
    }


def _cfg_phimoe(d):
    return {
        **_base(d, "phimoe", "PhiMoEForCausalLM"),
        "intermediate_size": d.moe_inter,
        "num_local_experts": d.experts,
        "num_experts_per_tok": d.top_k,
        "original_max_position_embeddings": 4096,
        "rope_scaling": None,
        "rms_norm_eps": 1e-5,
    }


def _cfg_qwen2_moe(d):
    return {
        **_base(d, "qwen2_moe", "Qwen2MoeForCausalLM"),
        "intermediate_size": d.dense_inter,
        "moe_intermediate_size": d.moe_inter,
        "shared_expert_intermediate_size": d.shared_inter * d.n_shared,
        "num_experts": d.experts,
        "num_experts_per_tok": d.top_k,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }


def _cfg_qwen3_moe(d):
    return {
        **_base(d, "qwen3_moe", "Qwen3MoeForCausalLM"),
        "intermediate_size": d.dense_inter,
        "moe_intermediate_size": d.moe_inter,
        "num_experts": d.experts,
        "num_experts_per_tok": d.top_k,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "head_dim": d.head_dim,
        "norm_topk_prob": True,
    }


def _cfg_olmoe(d):
    return {
        **_base(d, "olmoe", "OlmoeForCausalLM"),
        "intermediate_size": d.moe_inter,
        "num_experts": d.experts,
        "num_experts_per_tok": d.top_k,
        "head_dim": d.head_dim,
        "norm_topk_prob": False,
        "tie_word_embeddings": False,
    }


def _mla(d: Dims, q_lora: Optional[int]) -> dict:
    """Multi-head latent attention dims (DeepSeek); tiny, group-size friendly."""
    return {
        "kv_lora_rank": 64,
        "q_lora_rank": q_lora,
        "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 32,
        "v_head_dim": 32,
    }


# DeepSeek-V2-Lite's YaRN rope scaling (mlx_lm's deepseek_v2 requires one).
_DEEPSEEK_YARN = {
    "type": "yarn",
    "factor": 40,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
    "original_max_position_embeddings": 4096,
}


def _cfg_deepseek_v2(d):
    return {
        **_base(d, "deepseek_v2", "DeepseekV2ForCausalLM"),
        **_mla(d, None),
        "rope_scaling": dict(_DEEPSEEK_YARN),
        "max_position_embeddings": 163840,
        "num_key_value_heads": d.heads,
        "intermediate_size": d.dense_inter,
        "moe_intermediate_size": d.moe_inter,
        "n_routed_experts": d.experts,
        "n_shared_experts": d.n_shared,
        "num_experts_per_tok": d.top_k,
        "routed_scaling_factor": 1.0,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "moe_layer_freq": 1,
        "first_k_dense_replace": _n_dense(d),
    }


def _cfg_deepseek_v3(d):
    return {
        **_base(d, "deepseek_v3", "DeepseekV3ForCausalLM"),
        **_mla(d, 64),
        "num_key_value_heads": d.heads,
        "intermediate_size": d.dense_inter,
        "moe_intermediate_size": d.moe_inter,
        "n_routed_experts": d.experts,
        "n_shared_experts": d.n_shared,
        "num_experts_per_tok": d.top_k,
        "routed_scaling_factor": 1.0,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "n_group": 1,
        "topk_group": 1,
        "moe_layer_freq": 1,
        "first_k_dense_replace": _n_dense(d),
    }


def _cfg_gpt_oss(d):
    if d.layers < 2:
        raise ValueError("gpt_oss needs >= 2 layers (one sliding, one full attention)")
    types = ["sliding_attention", "full_attention"] * d.layers
    return {
        **_base(d, "gpt_oss", "GptOssForCausalLM"),
        "intermediate_size": d.moe_inter,
        "num_local_experts": d.experts,
        "num_experts_per_tok": d.top_k,
        "head_dim": d.head_dim,
        "sliding_window": 128,
        "rope_theta": 150000,
        "layer_types": types[: d.layers],
        "rms_norm_eps": 1e-5,
    }


def _cfg_granitemoe(d):
    return {
        **_base(d, "granitemoe", "GraniteMoeForCausalLM"),
        "intermediate_size": d.moe_inter,
        "num_local_experts": d.experts,
        "num_experts_per_tok": d.top_k,
        "attention_bias": False,
        "logits_scaling": 6.0,
        "attention_multiplier": 1.0 / (d.hidden // d.heads),
        "embedding_multiplier": 12.0,
        "residual_multiplier": 0.22,
        "tie_word_embeddings": True,
    }


def _cfg_llama4(d):
    # interleave step 2: layer 0 dense, layer 1 MoE (like Llama 4 Maverick);
    # top-1 routing (mlx_lm's llama4 asserts it) plus a shared expert.
    if d.layers < 4:
        raise ValueError("llama4 needs >= 4 layers (mlx_lm's llama4 reads layer 3's cache)")
    step = 2
    text = {
        "model_type": "llama4_text",
        "attention_bias": False,
        "attention_chunk_size": 8192,
        "head_dim": d.head_dim,
        "hidden_size": d.hidden,
        "interleave_moe_layer_step": step,
        "intermediate_size": d.moe_inter,
        "intermediate_size_mlp": d.dense_inter,
        "max_position_embeddings": 4096,
        "num_attention_heads": d.heads,
        "num_experts_per_tok": 1,
        "num_hidden_layers": d.layers,
        "num_key_value_heads": d.kv_heads,
        "num_local_experts": d.experts,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "rope_theta": 500000.0,
        "use_qk_norm": True,
        "vocab_size": d.vocab,
        "torch_dtype": "float32",
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
    }
    return {
        "model_type": "llama4",
        "architectures": ["Llama4ForConditionalGeneration"],
        "torch_dtype": "float32",
        "text_config": text,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
    }


def _cfg_glm4_moe(d):
    return {
        **_base(d, "glm4_moe", "Glm4MoeForCausalLM"),
        "intermediate_size": d.dense_inter,
        "moe_intermediate_size": d.moe_inter,
        "n_routed_experts": d.experts,
        "n_shared_experts": d.n_shared,
        "num_experts_per_tok": d.top_k,
        "norm_topk_prob": True,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.0,
        "first_k_dense_replace": _n_dense(d),
        "head_dim": d.head_dim,
        "rope_scaling": None,
        "use_qk_norm": True,
        "attention_bias": True,
        "partial_rotary_factor": 0.5,
    }


def _cfg_ernie4_5_moe(d):
    return {
        **_base(d, "ernie4_5_moe", "Ernie4_5_MoeForCausalLM"),
        "intermediate_size": d.dense_inter,
        "moe_intermediate_size": d.moe_inter,
        "moe_num_experts": d.experts,
        "moe_k": d.top_k,
        "moe_num_shared_experts": d.n_shared,
        "moe_layer_start_index": _n_dense(d),
        "moe_layer_interval": 1,
        "head_dim": d.head_dim,
        "use_bias": False,
        "rms_norm_eps": 1e-5,
    }


def _cfg_hunyuan(d):
    return {
        **_base(d, "hunyuan", "HunYuanMoEV1ForCausalLM"),
        "intermediate_size": d.shared_inter,  # shared MLP width per shared expert
        "moe_intermediate_size": d.moe_inter,
        "num_experts": d.experts,
        "moe_topk": d.top_k,
        "num_shared_expert": d.n_shared,
        "use_mixed_mlp_moe": True,
        "use_qk_norm": True,
        "use_cla": False,
        "cla_share_factor": 2,
        "attention_bias": False,
        "rope_scaling": {"type": "dynamic", "factor": 1.0, "alpha": 1.0},
    }


def _cfg_minimax(d):
    return {
        **_base(d, "minimax", "MiniMaxM2ForCausalLM"),
        "intermediate_size": d.moe_inter,
        "num_local_experts": d.experts,
        "num_experts_per_tok": d.top_k,
        "shared_intermediate_size": 0,
        "head_dim": d.head_dim,
        "rotary_dim": d.head_dim // 2,
        "scoring_func": "sigmoid",
        "use_qk_norm": True,
    }


def _cfg_jamba(d):
    # attention on odd layers, MoE on even: layer 0 = mamba + MoE,
    # layer 1 = attention + dense MLP, ...
    return {
        **_base(d, "jamba", "JambaForCausalLM"),
        "intermediate_size": d.moe_inter,
        "num_experts": d.experts,
        "num_experts_per_tok": d.top_k,
        "attn_layer_offset": 1,
        "attn_layer_period": 2,
        "expert_layer_offset": 0,
        "expert_layer_period": 2,
        "mamba_d_conv": 4,
        "mamba_d_state": 16,
        "mamba_expand": 2,
        "mamba_dt_rank": "auto",
        "mamba_proj_bias": False,
        "mamba_conv_bias": True,
        "tie_word_embeddings": True,
    }


def _cfg_dots1(d):
    return {
        **_base(d, "dots1", "Dots1ForCausalLM"),
        "intermediate_size": d.dense_inter,
        "moe_intermediate_size": d.moe_inter,
        "n_routed_experts": d.experts,
        "n_shared_experts": d.n_shared,
        "num_experts_per_tok": d.top_k,
        "first_k_dense_replace": _n_dense(d),
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.0,
        "scoring_func": "noaux_tc",
        "n_group": 1,
        "topk_group": 1,
        "head_dim": d.head_dim,
    }


def _cfg_lfm2_moe(d):
    # conv / attention alternate; the first layer is dense.
    types = [("conv" if i % 2 == 0 else "full_attention") for i in range(d.layers)]
    cfg = {
        **_base(d, "lfm2_moe", "Lfm2MoeForCausalLM"),
        "intermediate_size": d.dense_inter,
        "moe_intermediate_size": d.moe_inter,
        "num_experts": d.experts,
        "num_experts_per_tok": d.top_k,
        "norm_topk_prob": True,
        "use_expert_bias": True,
        "num_dense_layers": _n_dense(d),
        "norm_eps": 1e-5,
        "conv_bias": False,
        "conv_L_cache": 3,
        "layer_types": types,
    }
    cfg.pop("rms_norm_eps")
    return cfg


def _cfg_bailing_moe(d):
    return {
        **_base(d, "bailing_moe", "BailingMoeForCausalLM"),
        "intermediate_size": d.dense_inter,
        "moe_intermediate_size": d.moe_inter,
        "num_experts": d.experts,
        "num_shared_experts": d.n_shared,
        "num_experts_per_tok": d.top_k,
        "norm_topk_prob": True,
        "first_k_dense_replace": _n_dense(d),
        "use_qk_norm": True,
        "norm_head": False,  # True renormalizes lm_head at load: no exact round trip
    }


_CONFIGS: Dict[str, Callable[[Dims], dict]] = {
    "mixtral": _cfg_mixtral,
    "phimoe": _cfg_phimoe,
    "qwen2_moe": _cfg_qwen2_moe,
    "qwen3_moe": _cfg_qwen3_moe,
    "olmoe": _cfg_olmoe,
    "deepseek_v2": _cfg_deepseek_v2,
    "deepseek_v3": _cfg_deepseek_v3,
    "gpt_oss": _cfg_gpt_oss,
    "granitemoe": _cfg_granitemoe,
    "llama4": _cfg_llama4,
    "glm4_moe": _cfg_glm4_moe,
    "ernie4_5_moe": _cfg_ernie4_5_moe,
    "hunyuan": _cfg_hunyuan,
    "minimax": _cfg_minimax,
    "jamba": _cfg_jamba,
    "dots1": _cfg_dots1,
    "lfm2_moe": _cfg_lfm2_moe,
    "bailing_moe": _cfg_bailing_moe,
}

# Default layer counts: enough for every layer kind the family mixes
# (dense-first, interleaved, hybrid) plus at least one MoE layer.
_DEFAULT_LAYERS = {"lfm2_moe": 3, "llama4": 4}

# Families whose mlx_lm attention derives head_dim = hidden // heads.
_NO_HEAD_DIM = {"mixtral", "phimoe", "qwen2_moe", "granitemoe", "hunyuan", "jamba", "bailing_moe"}


# ---------------------------------------------------------------------------
# Presets


def _dims(
    family: str,
    shape: Optional[str],
    num_layers: Optional[int],
    num_experts: Optional[int],
    dims: Optional[dict] = None,
) -> Dims:
    d = Dims(layers=_DEFAULT_LAYERS.get(family, 2))
    if shape is not None:
        presets = load_shape_presets()
        if shape not in presets:
            raise ValueError(f"unknown shape preset {shape!r}; choose from {', '.join(presets)}")
        p = presets[shape]
        if p["mlx_family"] != family:
            raise ValueError(f"shape preset {shape!r} is for family {p['mlx_family']!r}, not {family!r}")
        heads = p.get("heads", d.heads)
        head_dim = p.get("head_dim", p["hidden"] // heads)
        if family in _NO_HEAD_DIM and head_dim * heads != p["hidden"]:
            raise ValueError(
                f"shape preset {shape!r} cannot be built: head_dim {head_dim} x {heads} heads != "
                f"hidden {p['hidden']}, and mlx_lm.models.{family} derives head_dim = hidden // heads"
            )
        d = replace(
            d,
            hidden=p["hidden"],
            moe_inter=p["expert_intermediate"],
            dense_inter=2 * p["expert_intermediate"],  # presets do not list it
            shared_inter=p.get("shared_expert_intermediate", p["expert_intermediate"]),
            n_shared=p.get("shared_experts", 1),
            experts=p["experts"],
            top_k=p["top_k"],
            heads=heads,
            kv_heads=p.get("kv_heads", heads),
            head_dim=head_dim,
            first_dense=p.get("first_dense_layers", 0),
        )
    if dims:  # explicit overrides, e.g. the demo's "small but not toy" model
        unknown = set(dims) - set(Dims.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown dims {sorted(unknown)}; known: {', '.join(Dims.__dataclass_fields__)}")
        d = replace(d, **dims)
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        d = replace(d, layers=num_layers)
    if num_experts is not None:
        if num_experts < 2:
            raise ValueError(f"num_experts must be >= 2, got {num_experts}")
        d = replace(d, experts=num_experts, top_k=min(d.top_k, num_experts))
    return d


def tiny_config(
    family: str,
    *,
    shape: Optional[str] = None,
    num_layers: Optional[int] = None,
    num_experts: Optional[int] = None,
    dims: Optional[dict] = None,
) -> dict:
    """The config.json dict ``make_tiny_model`` writes (before quantization)."""
    if family not in _CONFIGS:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    return _CONFIGS[family](_dims(family, shape, num_layers, num_experts, dims))


# ---------------------------------------------------------------------------
# Weights


def _moe_blocks(model: nn.Module) -> List[tuple]:
    """(switch module path, router weight key) for every MoE block, in layer order."""
    params = dict(tree_flatten(model.parameters()))
    blocks = []
    for path, mod in model.named_modules():
        if not isinstance(mod, SwitchGLU):
            continue
        n_experts, _, hidden = mod.up_proj.weight.shape  # (E, H, D), float at this point
        parent = path.rsplit(".", 1)[0]
        # The router is the block's other (experts, hidden) matrix.
        routers = [
            k
            for k, v in params.items()
            if k.startswith(parent + ".")
            and not k.startswith(path + ".")
            and k.endswith("weight")
            and v.shape == (n_experts, hidden)
        ]
        if len(routers) != 1:
            raise RuntimeError(f"cannot identify the router of {path}: {routers}")
        blocks.append((path, routers[0]))

    def layer_index(block):
        return [int(p) for p in block[0].split(".") if p.isdigit()]

    return sorted(blocks, key=layer_index)


class _Stop(Exception):
    pass


class _Capture(nn.Module):
    """Stands in for a router module during calibration: records its input and
    stops the forward pass (MLX is lazy, so later layers never run)."""

    def __init__(self, record: Callable[[mx.array], None]):
        super().__init__()
        self._record = record  # a function: kept out of the parameter tree

    def __call__(self, x, *args, **kwargs):
        self._record(x)
        raise _Stop


def _router_inputs(model: nn.Module, router_key: str, tokens: mx.array) -> np.ndarray:
    """The inputs the router ``router_key`` sees for ``tokens``, (N, D) float64."""
    owner = router_key.rsplit(".", 1)[0]  # the module that holds the router weight
    parent_path, name = owner.rsplit(".", 1)
    parent = dict(model.named_modules())[parent_path]
    inner = getattr(parent, name)
    seen = []
    setattr(parent, name, _Capture(seen.append))
    try:
        model(tokens)
    except _Stop:
        pass
    finally:
        setattr(parent, name, inner)
    x = np.array(seen[0].astype(mx.float32), dtype=np.float64)
    return x.reshape(-1, x.shape[-1])


def _init_weights(model: nn.Module, rng: np.random.Generator, skew: float) -> None:
    """Seeded weights that keep activations sane and make routing skew controllable.

    mlx's default inits (uniform +-1/sqrt(fan_in), seeded by the caller) keep a
    few random layers sane. On top of that, from ``rng``:

    - embeddings: token part N(0, 1) orthogonal to a unit direction u, plus
      sqrt(D) * u, so every token's stream carries a common component m;
    - zero-initialised biases get N(0, 0.02^2) so bias code paths run;
      router biases stay zero;
    - lm_head rows orthogonal to u (or, if tied, random-sign final-norm gains),
      so greedy decoding depends on the token content;
    - routers, calibrated in layer order on 256 (128 if D > 512) seeded tokens:
      N(0, 1/D) rows made orthogonal to the measured input mean m (skew 0 has
      no accidental per-expert offset), scaled to unit logit std over tokens,
      plus ``skew * log_pop[e] * m / |m|^2``, which shifts expert e's logit by
      ~ ``skew * log_pop[e]`` for every token. ``log_pop[e] = -log(1 + rank[e])``
      (Zipf), ranking drawn per layer. With 8 experts, top-2, the 2 hottest
      experts take ~30% of routed pairs at skew 0, ~58% at 1, ~78% at 2 (more
      experts concentrate faster).
    """
    params = dict(tree_flatten(model.parameters()))
    emb_keys = [p + ".weight" for p, m in model.named_modules() if isinstance(m, nn.Embedding)]
    if len(emb_keys) != 1:
        raise RuntimeError(f"expected one token embedding, found {emb_keys}")
    vocab, hidden = params[emb_keys[0]].shape
    blocks = _moe_blocks(model)
    router_keys = {r for _, r in blocks}
    new = {}
    for k in sorted(params):
        v = params[k]
        if k.endswith(".bias") and k[: -len(".bias")] + ".weight" in router_keys:
            new[k] = mx.zeros(v.shape, dtype=mx.float32)
        elif k.endswith(".bias") and v.ndim >= 1 and not mx.any(v).item():
            new[k] = mx.array(rng.normal(0.0, 0.02, v.shape).astype(np.float32))

    u = rng.normal(size=hidden)
    u /= np.linalg.norm(u)
    # (V, D) rows of norm ~ sqrt(2 D): large next to what a random layer adds
    # (~ sqrt(D) / 3), so the stream stays token-driven rather than mixed by attention.
    # Token parts are orthogonal to u so a tied lm_head ranks tokens by content.
    emb = rng.normal(0.0, 1.0, (vocab, hidden))
    emb += np.outer(math.sqrt(hidden) - emb @ u, u)
    new[emb_keys[0]] = mx.array(emb.astype(np.float32))
    # An untied lm_head sees u in every final state; without this projection
    # greedy decoding keeps picking the token whose row best matches u.
    for k in params:
        if k.endswith("lm_head.weight"):
            head = np.array(params[k], dtype=np.float64)  # (V, D)
            new[k] = mx.array((head - np.outer(head @ u, u)).astype(np.float32))
    if not any(k.endswith("lm_head.weight") for k in params):
        # Tied lm_head: logits = final_norm(h) . emb_t, and h is mostly its own
        # token's row, so greedy would echo the input. Random-sign final-norm
        # gains cancel that self-match; logits keep std ~ 3.
        norms = (nn.RMSNorm, nn.LayerNorm)
        finals = [p for p, m in model.named_modules() if isinstance(m, norms) and ".layers." not in p]
        if len(finals) == 1 and finals[0] + ".weight" in params:
            signs = rng.choice([-1.0, 1.0], hidden)
            new[finals[0] + ".weight"] = mx.array((3.0 * hidden**-0.5 * signs).astype(np.float32))
    routers = []  # (key, base rows (E, D), log_pop (E,)); drawn before calibrating
    for _, rk in blocks:
        n_experts = params[rk].shape[0]
        w = rng.normal(0.0, hidden**-0.5, (n_experts, hidden))
        log_pop = -np.log1p(rng.permutation(n_experts))  # rank 0 = hottest
        routers.append((rk, w, log_pop - log_pop.mean()))
        new[rk] = mx.array((w - np.outer(w @ u, u)).astype(np.float32))
    n_calib = 256 if hidden <= 512 else 128  # enough for a mean and a std per row
    calib = mx.array(rng.integers(3, TOKENIZER_VOCAB, (1, n_calib)))

    def to_f32(v):
        return v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v

    params.update(new)
    model.update(tree_unflatten([(k, to_f32(v)) for k, v in params.items()]))
    for rk, w, log_pop in routers:
        x = _router_inputs(model, rk, calib)  # (N, D)
        m = x.mean(axis=0)
        m_hat = m / np.linalg.norm(m)
        w = w - np.outer(w @ m_hat, m_hat)
        w /= ((x - m) @ w.T).std(axis=0)[:, None]  # per-token logits ~ N(0, 1)
        w += skew * np.outer(log_pop, m) / (m @ m)
        model.update(tree_unflatten([(rk, mx.array(w.astype(np.float32)))]))
    mx.eval(model.parameters())


def build_model(
    family: str,
    *,
    seed: int = 0,
    skew: float = 0.0,
    shape: Optional[str] = None,
    num_layers: Optional[int] = None,
    num_experts: Optional[int] = None,
    dims: Optional[dict] = None,
) -> tuple:
    """(model, config): mlx_lm's own model class for ``family``, seeded float32 weights.

    Reseeds ``mx.random`` (mlx's default inits draw from it).
    """
    config = tiny_config(family, shape=shape, num_layers=num_layers, num_experts=num_experts, dims=dims)
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    _init_weights(model, np.random.default_rng(seed), skew)
    return model, config


# ---------------------------------------------------------------------------
# Hugging Face layout (inverse of each family's Model.sanitize)

_SAME = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
_W123 = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def _unstack(w: dict, switch: str, experts: str, names: Dict[str, str]) -> dict:
    """``{L}.{switch}.{proj}.{leaf}`` (E, ...) -> ``{L}.{experts}.{e}.{names[proj]}.{leaf}``."""
    out = {}
    for k, v in w.items():
        head, sep, tail = k.partition(f".{switch}.")
        parts = tail.split(".")
        if sep and len(parts) == 2 and parts[0] in names:
            for e in range(v.shape[0]):
                out[f"{head}.{experts}.{e}.{names[parts[0]]}.{parts[1]}"] = v[e]
        else:
            out[k] = v
    return out


def _rename(w: dict, old: str, new: str) -> dict:
    return {k.replace(old, new): v for k, v in w.items()}


def _hf_deepseek_v3(w: dict, config: dict) -> dict:
    # embed_q (H, kv_lora, nope) and unembed_out (H, v_head, kv_lora) are split
    # out of kv_b_proj (H * (nope + v_head), kv_lora) by sanitize.
    out = {}
    for k, v in w.items():
        if k.endswith(".self_attn.embed_q.weight"):
            prefix = k[: -len(".embed_q.weight")]
            wv = w[prefix + ".unembed_out.weight"]
            kv_b = mx.concatenate([v.swapaxes(1, 2), wv], axis=1)  # (H, nope + v_head, kv_lora)
            out[prefix + ".kv_b_proj.weight"] = kv_b.reshape(-1, kv_b.shape[-1])
        elif not k.endswith(".self_attn.unembed_out.weight"):
            out[k] = v
    return _unstack(out, "mlp.switch_mlp", "mlp.experts", _SAME)


def _hf_granitemoe(w: dict, config: dict) -> dict:
    # input_linear (E, 2H, D) = [gate; up], output_linear (E, D, H).
    out = {}
    for k, v in w.items():
        if k.endswith(".switch_mlp.gate_proj.weight"):
            up = w[k.replace("gate_proj", "up_proj")]
            out[k.replace("switch_mlp.gate_proj", "input_linear")] = mx.concatenate([v, up], axis=1)
        elif k.endswith(".switch_mlp.down_proj.weight"):
            out[k.replace("switch_mlp.down_proj", "output_linear")] = v
        elif not k.endswith(".switch_mlp.up_proj.weight"):
            out[k] = v
    return out


def _hf_llama4(w: dict, config: dict) -> dict:
    # gate_up_proj (E, D, 2H) = [gate^T | up^T], down_proj (E, H, D); no ".weight".
    out = {}
    for k, v in w.items():
        if k.endswith(".feed_forward.experts.gate_proj.weight"):
            up = w[k.replace("gate_proj", "up_proj")]
            fused = mx.concatenate([v.swapaxes(1, 2), up.swapaxes(1, 2)], axis=-1)
            out[k.replace("gate_proj.weight", "gate_up_proj")] = fused
        elif k.endswith(".feed_forward.experts.down_proj.weight"):
            out[k.replace("down_proj.weight", "down_proj")] = v.swapaxes(1, 2)
        elif not k.endswith(".feed_forward.experts.up_proj.weight"):
            out[k] = v
    return out


def _hf_jamba(w: dict, config: dict) -> dict:
    # HF depthwise conv1d weight is (C, 1, K); MLX keeps (C, K, 1).
    w = {k: (v.swapaxes(1, 2) if k.endswith("conv1d.weight") else v) for k, v in w.items()}
    return _unstack(w, "feed_forward.switch_mlp", "feed_forward.experts", _SAME)


def _hf_lfm2_moe(w: dict, config: dict) -> dict:
    # HF uses w1/w2/w3 for dense and expert FFNs, and (C, 1, L) short-conv weights.
    w = {k: (v.swapaxes(1, 2) if k.endswith("conv.conv.weight") else v) for k, v in w.items()}
    w = _unstack(w, "feed_forward.switch_mlp", "feed_forward.experts", _W123)
    for old, new in _W123.items():
        w = _rename(w, f"feed_forward.{old}.weight", f"feed_forward.{new}.weight")
    return w


def _hf_bailing_moe(w: dict, config: dict) -> dict:
    w = _unstack(w, "mlp.switch_mlp", "mlp.experts", _SAME)
    return _rename(w, ".mlp.gate.gate_proj.", ".mlp.gate.")


def _hf_simple(switch: str, experts: str, names: Dict[str, str]):
    return lambda w, config: _unstack(w, switch, experts, names)


_TO_HF: Dict[str, Callable[[dict, dict], dict]] = {
    "mixtral": _hf_simple("block_sparse_moe.switch_mlp", "block_sparse_moe.experts", _W123),
    "phimoe": _hf_simple("block_sparse_moe.switch_mlp", "block_sparse_moe.experts", _W123),
    "minimax": _hf_simple("block_sparse_moe.switch_mlp", "block_sparse_moe.experts", _W123),
    "qwen2_moe": _hf_simple("mlp.switch_mlp", "mlp.experts", _SAME),
    "qwen3_moe": _hf_simple("mlp.switch_mlp", "mlp.experts", _SAME),
    "olmoe": _hf_simple("mlp.switch_mlp", "mlp.experts", _SAME),
    "deepseek_v2": _hf_simple("mlp.switch_mlp", "mlp.experts", _SAME),
    "glm4_moe": _hf_simple("mlp.switch_mlp", "mlp.experts", _SAME),
    "ernie4_5_moe": _hf_simple("mlp.switch_mlp", "mlp.experts", _SAME),
    "hunyuan": _hf_simple("mlp.switch_mlp", "mlp.experts", _SAME),
    "dots1": _hf_simple("mlp.experts", "mlp.experts", _SAME),
    "deepseek_v3": _hf_deepseek_v3,
    "granitemoe": _hf_granitemoe,
    "llama4": _hf_llama4,
    "jamba": _hf_jamba,
    "lfm2_moe": _hf_lfm2_moe,
    "bailing_moe": _hf_bailing_moe,
}
HF_LAYOUT_FAMILIES = tuple(f for f in FAMILIES if f in _TO_HF)


def hf_weights(family: str, model: nn.Module, config: dict) -> Dict[str, mx.array]:
    """The family's Hugging Face checkpoint tensors for ``model`` (float).

    Checked: ``model.sanitize`` maps them back to exactly ``model``'s parameters.
    """
    if family not in _TO_HF:
        reason = HF_LAYOUT_UNSUPPORTED.get(family, "no inverse sanitize written")
        raise ValueError(f"hf_layout is not supported for family {family!r}: {reason}")
    mlx_w = dict(tree_flatten(model.parameters()))
    hf = {k: mx.contiguous(v) for k, v in _TO_HF[family](dict(mlx_w), config).items()}
    back = model.sanitize(dict(hf))
    bad = sorted(set(back) ^ set(mlx_w))
    bad += [k for k in mlx_w if k in back and not mx.array_equal(back[k], mlx_w[k]).item()]
    if bad:
        raise RuntimeError(f"{family}: HF layout does not round-trip through sanitize: {bad[:4]}")
    return hf


# ---------------------------------------------------------------------------
# Writing


# What the factory writes (glob patterns; its marker lists them, see owned.py).
TINY_FILES = (
    "config.json", "model*.safetensors", "model.safetensors.index.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", MARKER,
)


def make_tiny_model(
    out: Union[str, Path],
    family: str,
    *,
    q_bits: Optional[int] = None,
    q_group_size: int = 32,
    hf_layout: bool = False,
    shape: Optional[str] = None,
    skew: float = 0.0,
    seed: int = 0,
    num_layers: Optional[int] = None,
    num_experts: Optional[int] = None,
    dims: Optional[dict] = None,
    force: bool = False,
) -> Path:
    """Write a random checkpoint loadable by ``mlx_lm.load(out)``; returns ``out``.

    ``dims`` overrides any ``Dims`` field (hidden, moe_inter, experts, top_k, ...).

    The folder is built next to ``out`` and renamed into place, so a reader
    never sees a half-written model. An existing ``out`` is replaced only if it
    is empty or holds nothing but a previous factory output; a factory folder
    that also holds other files (notes, a built bundle) is refused, or with
    ``force`` gets only the factory's own files replaced (see owned.py).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    if q_bits not in (None, 4, 8):
        raise ValueError(f"q_bits must be 4 or 8, got {q_bits}")
    if q_bits is not None and hf_layout:
        raise ValueError("hf_layout writes float checkpoints; quantize with mlx_lm.convert instead")
    if hf_layout and family not in _TO_HF:
        raise ValueError(f"hf_layout is not supported for family {family!r}: {HF_LAYOUT_UNSUPPORTED[family]}")
    d = _dims(family, shape, num_layers, num_experts, dims)  # validates shape / counts
    if q_bits is not None and (d.hidden % q_group_size or d.moe_inter % q_group_size):
        raise ValueError(
            f"q_group_size {q_group_size} must divide hidden {d.hidden} and expert width {d.moe_inter}"
        )
    if not math.isfinite(skew) or skew < 0:
        raise ValueError(f"skew must be a finite number >= 0, got {skew}")
    out = Path(out)
    owned.check(out, MARKER, "tiny-model", force, legacy=TINY_FILES)  # fail before the slow part

    model, config = build_model(
        family, seed=seed, skew=skew, shape=shape, num_layers=num_layers, num_experts=num_experts, dims=dims
    )
    moe_layers = [p for p, _ in _moe_blocks(model)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if hf_layout:
            weights = hf_weights(family, model, config)
            mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
        else:
            if q_bits is not None:
                with contextlib.redirect_stdout(io.StringIO()):  # its "[INFO] ..." line
                    model, config = quantize_model(model, config, q_group_size, q_bits, mode="affine")
            save_model(tmp, model)
        save_config(config, tmp / "config.json")
        n_tokens = build_tokenizer_files(tmp)
        vocab = config.get("text_config", config)["vocab_size"]
        assert n_tokens <= vocab, (n_tokens, vocab)
        info = {
            "factory": "npumoe_mlx.tools.tiny",
            "family": family,
            "seed": seed,
            "skew": skew,
            "q_bits": q_bits,
            "q_group_size": q_group_size if q_bits else None,
            "hf_layout": hf_layout,
            "shape": shape,
            "num_layers": d.layers,
            "num_experts": d.experts,
            "dims": dims,
            "moe_layers": moe_layers,
            "tokenizer_size": n_tokens,
            "files": list(TINY_FILES),
        }
        (tmp / MARKER).write_text(json.dumps(info, indent=2))
        honour_umask(tmp)
        owned.publish(tmp, out, owned.check(out, MARKER, "tiny-model", force, legacy=TINY_FILES))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------
# CLI


def main(argv: Optional[List[str]] = None) -> int:
    """``npumoe tiny-model --family F --out DIR [...]``; 2 on bad input."""
    parser = Parser(
        prog="npumoe tiny-model", description="Write a random tiny MoE checkpoint (offline)."
    )
    parser.add_argument("--family", required=True, help=f"one of: {', '.join(FAMILIES)}")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--q-bits", type=int, default=None, help="4 or 8 (MLX affine); float32 if unset")
    parser.add_argument("--q-group-size", type=int, default=32)
    parser.add_argument("--hf-layout", action="store_true", help="write the Hugging Face layout (float)")
    parser.add_argument("--shape", default=None, help="real-model shape preset, e.g. qwen3-30b-a3b")
    parser.add_argument("--skew", type=float, default=0.0, help="router popularity skew (0 = uniform)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--experts", type=int, default=None, help="override the expert count")
    parser.add_argument("--force", action="store_true",
                        help="replace a previous factory output even if the folder holds other files "
                        "(only the factory's own files are replaced; the rest is kept)")
    try:
        args = parser.parse_args(argv)
        out = make_tiny_model(
            args.out,
            args.family,
            q_bits=args.q_bits,
            q_group_size=args.q_group_size,
            hf_layout=args.hf_layout,
            shape=args.shape,
            skew=args.skew,
            seed=args.seed,
            num_layers=args.layers,
            num_experts=args.experts,
            force=args.force,
        )
    except SystemExit as e:  # --help
        return e.code or 0
    except (ArgError, ValueError, FileExistsError) as e:
        print(f"npumoe tiny-model: error: {e}", file=sys.stderr)
        return 2
    kind = "hf-layout float32" if args.hf_layout else (f"q{args.q_bits}" if args.q_bits else "float32")
    print(f"wrote {args.family} tiny model ({kind}, seed {args.seed}, skew {args.skew:g}) to {out}")
    return 0


if __name__ == "__main__":
    from ..log import console

    console()  # `[npumoe] ...` lines, as the npumoe command shows them
    sys.exit(main())
