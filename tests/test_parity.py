"""Every factory family, float32 and q4: our load + reference executor == stock mlx_lm."""

import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load as stock_load
from mlx_lm.sample_utils import make_sampler
from safetensors import safe_open

import npumoe_mlx
from npumoe_mlx.runtime import experts
from npumoe_mlx.tools.tiny import FAMILIES

from conftest import PROMPT, greedy



def _moe_layers_from_files(path) -> set:
    """Layers whose saved tensors belong to routed experts (independent of the seam)."""
    layers = set()
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "np") as st:
            for k in st.keys():
                m = re.search(r"layers\.(\d+)\..*(switch_mlp|(?<!shared_)experts)\.", k)
                if m:
                    layers.add(int(m.group(1)))
    return layers


@pytest.mark.parametrize("q_bits", [None, 4], ids=["f32", "q4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_parity(tiny_models, family, q_bits):
    path = tiny_models(family, q_bits=q_bits, seed=3)
    stock, tok = stock_load(str(path))
    ours, tok2, config = npumoe_mlx.load(str(path), offload="mlx", return_config=True, quiet=True)

    blocks = experts.installed_blocks(ours)
    assert blocks, "no expert block was installed"
    found = {b.layer for b in experts.find_expert_blocks(ours, config)}
    assert found == _moe_layers_from_files(path)

    # greedy 32 tokens through our API == stock mlx_lm
    want = greedy(stock, tok, PROMPT, 32)
    got = [r.token for r in npumoe_mlx.stream_generate(ours, tok2, PROMPT, max_tokens=32, sampler=make_sampler(0.0))]
    assert got == want

    # logits on a 64-token prompt within 1e-4 relative
    ids = mx.array(tok.encode(PROMPT * 4)[:64])[None]
    assert ids.shape[1] == 64
    a, b = np.array(ours(ids)), np.array(stock(ids))
    assert np.isfinite(b).all()
    rel = np.abs(a - b).max() / np.abs(b).max()
    assert rel <= 1e-4, f"max relative logit difference {rel:.2e}"
