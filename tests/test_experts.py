"""The seam: installing and removing the executor keeps parameters and keys."""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models import qwen3_moe
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

from npumoe_mlx.runtime import experts
from npumoe_mlx.runtime.reference import StaticTierReference


def _model():
    args = qwen3_moe.ModelArgs.from_dict(
        dict(
            model_type="qwen3_moe", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
            num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[1],
            moe_intermediate_size=32, rms_norm_eps=1e-6, vocab_size=300, rope_theta=10000.0,
            tie_word_embeddings=False, max_position_embeddings=512, norm_topk_prob=True,
        )
    )
    mx.random.seed(0)
    m = qwen3_moe.Model(args)
    mx.eval(m.parameters())
    return m


def test_find_describes_only_moe_layers():
    m = _model()
    blocks = experts.find_expert_blocks(m, {"num_experts_per_tok": 2})
    assert [(b.layer, b.path) for b in blocks] == [(0, "model.layers.0.mlp.switch_mlp")]
    b = blocks[0]
    assert (b.num_experts, b.top_k, b.dims, b.hidden) == (8, 2, 64, 32)
    assert (b.activation, b.bias, b.quant, b.dtype, b.supported) == ("swiglu", False, None, "float32", True)
    d = b.to_dict()
    assert "module" not in d and d["path"] == b.path


def test_install_keeps_keys_and_output_then_remove():
    m = _model()
    tokens = mx.array([[1, 5, 9, 33, 2, 7]])
    want = m(tokens)
    keys = [k for k, _ in tree_flatten(m.parameters())]
    ex = StaticTierReference()
    installed = experts.install(m, lambda blk: ex)
    assert len(installed) == 1
    assert isinstance(m.model.layers[0].mlp.switch_mlp, experts.OffloadedSwitchGLU)
    assert [k for k, _ in tree_flatten(m.parameters())] == keys
    got = m(tokens)
    assert ex.calls > 0
    assert mx.allclose(got, want, rtol=1e-5, atol=1e-5).item()
    assert experts.remove(m) == 1
    assert type(m.model.layers[0].mlp.switch_mlp) is SwitchGLU
    assert [k for k, _ in tree_flatten(m.parameters())] == keys


def test_unsupported_stays_stock_with_notice(capsys):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.switch_mlp = SwitchMLP(16, 8, 4)

    class Gelu(nn.Module):
        def __call__(self, x, gate):
            return x * gate

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [Block(), Block()]
            self.layers[1].switch_mlp = SwitchGLU(16, 8, 4, activation=Gelu())

    m = Model()
    blocks = experts.find_expert_blocks(m)
    assert [b.supported for b in blocks] == [False, False]
    assert "SwitchMLP" in blocks[0].reason and "unknown activation Gelu" in blocks[1].reason
    assert experts.install(m, lambda blk: StaticTierReference()) == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("stays on stock MLX" in line for line in err)
