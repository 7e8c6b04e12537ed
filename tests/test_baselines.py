"""The paper's baselines in `npumoe replay` (issue 21, item 8): Core ML CPU-only, naive NPU (one
graph per expert, no tiers), ANEMLL (experts on the CPU), beside all-on-GPU, each predicted from
the cost model; and chip numbers from a single small benchmark say so."""

import json

import numpy as np
import pytest

from npumoe_mlx.backends.registry import chip_cost
from npumoe_mlx.cli import replay as rp
from npumoe_mlx.planning.chips import chip_profile, format_chips, load_chips, profile_entry
from npumoe_mlx.planning.cost import flops_per_row
from npumoe_mlx.planning.plan import PlanLimits

D, H, E, K, SEQ = 2048, 768, 16, 4, 512


def _trace(seed=0, seqs=8, k=K):
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, E + 1) ** 0.8
    return {0: np.stack([rng.choice(E, k, replace=False, p=p / p.sum()) for _ in range(seqs * SEQ)])}


@pytest.fixture(scope="module")
def out():
    cost = chip_cost("m1-max", "coreml", D, H)
    cpu = rp.cpu_rate("m1-max")
    t = _trace()
    return cost, cpu, t, rp.replay([t], [t], D, H, cost, PlanLimits.for_backend("coreml"), (128, 512), SEQ, cpu=cpu)


def test_baselines_are_the_cost_models_own_numbers(out):
    """Each baseline recomputed here from the cost model, call by call: a wrong formula fails."""
    cost, cpu, t, res = out
    assert cpu == (1.4e12, 8.1)  # m1-max's measured CPU (nod.ai, a single benchmark)
    for n in (128, 512):
        counts = rp.call_counts(t[0], E, n, SEQ)  # (S, E)
        naive_s = naive_j = cpu_s = gpu_s = 0.0
        for c in counts:
            m = int((c > 0).sum())
            naive_s += cost.sync_s + m * (cost.dispatch_s + max(cost.expert_s, n * flops_per_row(D, H) / cost.program_flops)
                                          + n * D * cost.copy_bytes / cost.copy_bps)
            naive_j += m * (cost.program_j_per_call + n * flops_per_row(D, H) * cost.program_j_per_flop)
            cpu_s += c.sum() * flops_per_row(D, H) / 1.4e12
            gpu_s += cost.mlx_s(int(c.sum()), D, H)
        s, S = res["summary"][str(n)], len(counts)
        assert s["naive_s"] == pytest.approx(naive_s / S) and s["naive_j"] == pytest.approx(naive_j / S)
        assert s["cpu_s"] == pytest.approx(cpu_s / S) and s["cpu_j"] == pytest.approx(cpu_s / S * 8.1)
        b = s["baselines"]
        assert b["all_gpu"]["latency_x"] == pytest.approx(gpu_s / S / s["predicted_s"])
        assert b["naive_npu"]["latency_x"] == pytest.approx(naive_s / S / s["predicted_s"])
        assert b["coreml_cpu"]["energy_x"] == pytest.approx(cpu_s / S * 8.1 / s["predicted_j"])
        assert b["anemll"] == b["coreml_cpu"]  # experts on the CPU: the same expert-FFN cost
        assert b["naive_npu"]["latency_x"] > 1 and b["coreml_cpu"]["latency_x"] > 1


def test_replay_prints_the_baselines_beside_the_papers(out, capsys, tmp_path):
    text = rp.format_baselines(out[3]["summary"])
    for label in ("all on the GPU (MLX)", "Core ML CPU-only", "naive NPU", "ANEMLL", "1.32-5.55x", "1.81-7.37x"):
        assert label in text
    # without a CPU measurement: n/a, and how to give one
    cost = chip_cost("m2-max", "coreml", D, H)
    assert rp.cpu_rate("m2-max") is None
    t = _trace(1, 4)
    res = rp.replay([t], [t], D, H, cost, PlanLimits.for_backend("coreml"), (512,), SEQ)
    b = res["summary"]["512"]["baselines"]
    assert b["coreml_cpu"]["latency_x"] is None and b["naive_npu"]["latency_x"] > 1
    assert "n/a" in rp.format_baselines(res["summary"]) and "--cpu-tflops" in rp.format_baselines(res["summary"])
    with pytest.raises(ValueError, match="--cpu-power-w"):
        rp.cpu_rate("m2-max", 2.0, None)
    assert rp.cpu_rate("m2-max", 2.0, 10.0) == (2e12, 10.0)


def test_cli_replay_writes_baselines(tmp_path, capsys):
    t = _trace(2, 4, k=8)  # qwen3-30b-a3b routes top-8 (replay refuses a trace of another top-k)
    rp.save_routes(tmp_path / "t.npz", t)
    rp.main(["--shape", "qwen3-30b-a3b", "--calibrate", str(tmp_path / "t.npz"), "--backend", "coreml",
             "--chip", "m2-max", "--tokens", "512", "--seq-len", str(SEQ), "--cpu-tflops", "2", "--cpu-power-w", "10",
             "--json", str(tmp_path / "o.json")])
    printed = capsys.readouterr().out
    assert "naive NPU" in printed and "paper: NPUMoE" in printed
    b = json.loads((tmp_path / "o.json").read_text())["summary"]["512"]["baselines"]
    assert set(b) == set(rp.BASELINES) and b["coreml_cpu"]["latency_x"] > 0


def test_single_benchmark_chip_numbers_say_so():
    m5 = chip_profile("m5")
    assert "single small benchmark" in m5.caveats["gpu_tflops"] and "understated" in m5.caveats["gpu_tflops"]
    for p in load_chips().values():  # one measurement each, used for every chip
        assert all("single small benchmark" in p.caveats[f] for f in ("ane_dispatch_s", "sync_s"))
    assert "6.49*" in format_chips([m5])
    assert load_chips()["m1-max"].caveats["cpu_tflops"] == "single small benchmark"
    entry = profile_entry(m5)  # written back as read
    assert entry["gpu_tflops"]["single_benchmark"] is True and "uncertain" in entry["gpu_tflops"]
