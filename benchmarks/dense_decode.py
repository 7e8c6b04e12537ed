"""Decode with dense programs: a dense (non-MoE) qwen3 model at qwen3-30b-a3b attention dims
(hidden 2048, 32 heads, 4 kv heads, head_dim 128), 4 layers, MLP 768, 4-bit, random weights:
greedy decode tok/s of stock MLX vs dense programs with 1-row calls on programs (what the
decode margin picks when the program takes < half MLX's time) and on MLX. Costs are injected
so each variant is what it says; tokens must be equal. Small: no big-run lock.

    python benchmarks/dense_decode.py benchmarks/results/dense-decode-qwen3dims-dense.json
"""
from npumoe_mlx.atomic import write_json
from npumoe_mlx.tools.report import loadavg_at_end, machine_info
import time, sys, mlx.core as mx, mlx.nn as nn
from mlx_lm.models import qwen3
from mlx_lm.generate import generate_step
from npumoe_mlx.runtime import dense
args = qwen3.ModelArgs(model_type="qwen3", hidden_size=2048, num_hidden_layers=4, intermediate_size=768,
    num_attention_heads=32, rms_norm_eps=1e-6, vocab_size=1000, num_key_value_heads=4, head_dim=128,
    max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=True)
def make():
    mx.random.seed(0); m = qwen3.Model(args); nn.quantize(m, group_size=32, bits=4); mx.eval(m.parameters()); return m
prompt = mx.array(list(range(1, 200)))
def run(m, n=24):
    toks=[]; t0=None
    for i,(tok,_) in enumerate(generate_step(prompt, m, max_tokens=n)):
        if i==0: t0=time.perf_counter()
        toks.append(int(tok))
    return toks, (n-1)/(time.perf_counter()-t0)
machine = machine_info()
stock=make()
keys={dense.shape_key(l) for _,l in dense.find_linears(stock)}
res={}
for label, mr in (("stock",None),("dense_decode_on_programs",1),("dense_decode_on_mlx",2),("stock2",None)):
    m=make()
    if mr:
        # program wins by far at 128 rows; at 1 row: decode margin decides (mr=1: wins by >2x; mr=2: not)
        c={k:{"rows":[1,128],"mlx_s":[1.0,10.0],"program_s":[0.1 if mr==1 else 0.9,0.1]} for k in keys}
        dense.install(m, costs=dense.DenseCosts(c), quiet=True)
    run(m, 4)
    toks, tps = run(m)
    res[label]=(tps, toks[:8])
    print(label, f"{tps:.1f} tok/s", toks[:8], flush=True)

assert all(v[1] == res["stock"][1] for v in res.values()), "tokens differ"
write_json(sys.argv[1], {"decode_tps": {k: v[0] for k, v in res.items()}, "tokens_equal": True,
                         "prompt_tokens": int(prompt.size), "generated": 24,
                         "machine": {**machine, **loadavg_at_end()},
                         "command": "python benchmarks/dense_decode.py " + sys.argv[1]})
