"""Builds npumoe_mlx/data/chips.json and benchmarks/chips.md from public measurements.

Every number is either read from a public source (value + url, transcribed below) or
derived from such numbers by a stated rule (the rule goes into the number's "note").
Regenerate after changing a number here:

    python benchmarks/build_chips.py npumoe_mlx/data/chips.json benchmarks/chips.md

chips.md also states issue 10's chip targets against what the planner predicts on the shared
routing traces (benchmarks/results/replay.json, written by benchmarks/replay_all.py) and the
bounds no partition can beat; refresh that file first when the planner changes.
"""

import json
import os
import sys

AF = "https://github.com/sbryngelson/ANEForge/blob/main/bench/results/rooflines/"
AF_RUN = {
    "m1": AF + "roofline-apple-m1-MacBookAir10_1-bb9e71be3ae6-22b6e4fa.json",
    "m1-max": AF + "roofline-apple-m1-max-MacBookPro18_2-8dc9588b5db6-85ebfafa.json",
    "m2-pro": AF + "roofline-apple-m2-pro-Mac14_12-723396ad9091-44d76599.json",
    "m2-max": AF + "roofline-apple-m2-max-Mac14_6-8c6229361be7-773f5b28.json",
    "m4": AF + "roofline-apple-m4-Mac16_12-d4109cd41a75-6779bad2.json",
    "m4-pro": AF + "roofline-apple-m4-pro-Mac16_7-7fdf43ae2309-9094e75f.json",
    "m4-max": AF + "roofline-apple-m4-max-Mac16_6-c77b1414be16-d11ec8da.json",
    "m5": AF + "roofline-apple-m5-Mac17_3-019d3ac27339-dd5e5c95.json",
}
AF_WHAT = {  # the machine of each ANEForge run (GPU cores matter for GPU numbers)
    "m1": "MacBook Air M1, 7-core GPU",
    "m1-max": "MacBook Pro M1 Max, 32-core GPU",
    "m2-pro": "Mac mini M2 Pro, 16-core GPU",
    "m2-max": "MacBook Pro M2 Max, 38-core GPU",
    "m4": "MacBook Air M4, 8-core GPU",
    "m4-pro": "MacBook Pro M4 Pro, 20-core GPU",
    "m4-max": "MacBook Pro M4 Max, 32-core GPU",
    "m5": "MacBook Air M5, on battery",
}
# ANEForge device_saturation_sweep, square fp16 GEMM N=2048 and N=4096 (min latency over reps):
# ANE = aneforge-compiled program, GPU = MLX `x @ W` + mx.eval; power = powermetrics rail (mW) during a
# sustained loop at that size. (N=2048, N=4096) pairs, GFLOP/s and mW.
ANE_GFLOPS = {
    "m1": (3463.2, 4330.3), "m1-max": (3929.0, 4586.6), "m2-pro": (2295.8, 3364.7),
    "m2-max": (4506.5, 5381.7), "m4": (4890.0, 5435.3), "m4-pro": (6199.8, 6142.6),
    "m4-max": (8871.2, 6683.4), "m5": (8605.0, 7260.2),
}
ANE_MW = {
    "m1": (4480.5, 5047.5), "m1-max": (3011.5, 3585.0), "m2-pro": (1670.0, 2610.0),
    "m2-max": (3581.5, 4623.5), "m4": (3201.5, 3644.0), "m4-pro": (4337.0, 4637.0),
    "m4-max": (6007.5, 5223.0), "m5": (6404.0, 6124.0),
}
GPU_GFLOPS = {  # measured GPU core count in AF_WHAT
    "m1": (1952.5, 1927.2), "m2-pro": (4630.4, 5017.7), "m4": (2688.2, 2796.9),
    "m4-pro": (6910.0, 7545.5), "m4-max": (10586.3, 11839.4),
}
GPU_MW = {
    "m1": (9633.0, 10235.5), "m2-pro": (22974.0, 24543.0), "m4": (16429.0, 17609.5),
    "m4-pro": (25428.5, 28450.0), "m4-max": (41256.5, 44347.0),
}
GPU_CORES_MEASURED = {"m1": 7, "m2-pro": 16, "m4": 8, "m4-pro": 20, "m4-max": 32}
# top-bin GPU core count of each chip (Apple spec pages; the profile describes the top bin)
GPU_CORES = {
    "m1": 8, "m1-pro": 16, "m1-max": 32, "m1-ultra": 64,
    "m2": 10, "m2-pro": 19, "m2-max": 38, "m2-ultra": 76,
    "m3": 10, "m3-pro": 18, "m3-max": 40, "m3-ultra": 80,
    "m4": 10, "m4-pro": 20, "m4-max": 40, "m5": 10,
}

MB = "https://github.com/philipturner/metal-benchmarks (README, 'Overview of Apple-designed GPUs' table, GFLOPS F16)"
HMC_M3MAX = "https://hmc-tech.com/gpu/apple-32-core-m4-max-vs-apple-40-core-m3-max (40-core M3 Max 14.32 TFLOPS FP16 at 1398 MHz; 32-core M4 Max 13.74 TFLOPS)"
HMC_M3PRO = "https://hmc-tech.com/gpu/apple-32-core-m4-max-vs-apple-18-core-m3-pro (18-core M3 Pro 6.44 TFLOPS FP16)"
# peak fp16 GFLOPS of the top bin, with its source
GPU_PEAK = {
    "m1": (2617, MB), "m1-pro": (5308, MB), "m1-max": (10617, MB), "m1-ultra": (21233, MB),
    "m2": (3579, MB), "m2-pro": (6800, MB), "m2-max": (13600, MB),
    "m2-ultra": (27200, MB + " : 2 x M2 Max (13600), the two M2 Max dies of an M2 Ultra"),
    "m3-pro": (6440, HMC_M3PRO), "m3-max": (14320, HMC_M3MAX),
    "m4-max": (13740 * 40 / 32, HMC_M3MAX),
}

ANEMLL = "https://github.com/Anemll/anemll-bench/blob/main/Results.MD (llama_lm_head ANE memory bandwidth)"
ANE_BW = {
    "m1": 60.87, "m1-pro": 54.90, "m1-max": 54.62, "m1-ultra": 54.72,
    "m2": 60.45, "m2-pro": 61.93, "m2-max": 62.01, "m2-ultra": 61.68,
    "m3": 63.10, "m3-max": 120.22, "m4": 64.18, "m4-pro": 126.36, "m4-max": 118.88, "m5": 70.21,
}


GPU_BW = {  # memory bandwidth of the top bin, as Apple announced it (pages that quote the announcement)
    "m1": (68, "https://github.com/Anemll/anemll-bench/blob/main/Results.MD ('System Mem BW' column: M1 68 GB/s) ; https://www.macrumors.com/2022/06/06/apple-announces-m2-chip-with-support-for-up-to-24gb-memory/ (M2 100GB/s 'up 50 percent from the M1')"),
    "m1-pro": (200, "https://9to5mac.com/2021/10/18/apple-unveils-next-generation-m1-pro-and-m1-max-chips-for-new-macs/ (M1 Pro 200GB/s)"),
    "m1-max": (400, "https://9to5mac.com/2021/10/18/apple-unveils-next-generation-m1-pro-and-m1-max-chips-for-new-macs/ (M1 Max 400GB/s)"),
    "m1-ultra": (800, "https://etechnews.pk/apple-silicon-m1-ultra-apple-powerful-chipset-launched/ (M1 Ultra 'Memory bandwidth: 800GB/s', Apple's figures)"),
    "m2": (100, "https://www.macrumors.com/2022/06/06/apple-announces-m2-chip-with-support-for-up-to-24gb-memory/ (M2 100GB/s)"),
    "m2-pro": (200, "https://www.macrumors.com/2023/01/18/things-to-know-about-m2-pro-m2-max/ (M2 Pro 200GB/s)"),
    "m2-max": (400, "https://www.macrumors.com/2023/01/18/things-to-know-about-m2-pro-m2-max/ (M2 Max 400GB/s)"),
    "m2-ultra": (800, "https://blog.patti.tech/2023/06/05/as-rumored-the-mac-studio-gets-an-m2-refresh-including-fused-together-m2-ultra (Ars Technica: M2 Ultra 800 GB/s)"),
    "m3": (100, "https://github.com/Anemll/anemll-bench/blob/main/Results.MD ('System Mem BW' column: M3 100 GB/s)"),
    "m3-pro": (150, "https://www.macrumors.com/2023/10/31/apple-m3-pro-less-memory-bandwidth/ (M3 Pro 150GB/s per Apple's specifications)"),
    "m3-max": (400, "https://www.macrumors.com/2023/10/31/apple-m3-pro-less-memory-bandwidth/ (M3 Max 'up to 400GB/s'; the 30-core-GPU bin has 300GB/s)"),
    "m3-ultra": (819, "https://techpowerup.com/news-tags/Mac%20Studio (M3 Ultra: 'memory bandwidth of 819 GB/s')"),
    "m4": (120, "https://www.neowin.net/news/apple-launches-new-m4-pro-and-m4-max-processors/ (M4 120GB/s)"),
    "m4-pro": (273, "https://www.neowin.net/news/apple-launches-new-m4-pro-and-m4-max-processors/ (M4 Pro 273GB/s)"),
    "m4-max": (546, "https://www.macrumors.com/2024/10/30/apple-announces-m4-max-chip/ (M4 Max 'up to 546GB/s'; the 32-core-GPU bin has less)"),
    "m5": (153, "https://www.fonearena.com/blog/466700/apple-m5-specs-features.html (M5 153GB/s unified memory bandwidth)"),
}

MLX_KERNEL = "https://github.com/ml-explore/mlx/issues/4521"
MLX_SYNC = "https://github.com/ml-explore/mlx/issues/4438"
COREML_PREDICT = "https://github.com/aosama/astronomical/issues/540"
LARQL = "https://github.com/chrishayuk/larql/pull/312"

CHIPS = list(GPU_CORES)


def mean(p):
    return (p[0] + p[1]) / 2


def item(value, source, note=None, single=False, uncertain=None):
    """One number; ``single``: it comes from one small benchmark; ``uncertain``: why a public
    source disagrees (both shown by `npumoe chips`)."""
    out = {"value": float(f"{float(value):.6g}"), "source": source}
    if note:
        out["note"] = note
    if single:
        out["single_benchmark"] = True
    if uncertain:
        out["uncertain"] = uncertain
    return out


M5_GPU_UNCERTAIN = ("likely understated up to ~2x: Apple ML Research ('Exploring LLMs with MLX and the Neural "
                    "Accelerators in the M5 GPU', macOS 26.2) reports up to ~4x M4's time to first token in MLX, "
                    "i.e. a prefill GEMM rate near 12-14 TFLOP/s against M4's 3.43 (coreml-evidence.md Q4); "
                    "no larger public M5 GEMM measurement was found")
# CPU (optional fields, the paper's Core ML CPU-only / ANEMLL baselines in `npumoe replay`): the one
# public measurement found. None for the paper's own M2 Max / M2 Ultra (replay: --cpu-tflops).
NOD_M1MAX = "https://nod.ai/apple-m1max-matmul-perf/"
CPU = {"m1-max": (item(1.4, NOD_M1MAX + " (mmperf, Accelerate fp32 matmul, M1 Max 10-core)",
                       "'1.4 TFLOPs @~8.1W of FP32', single-threaded benchmark (mostly one core's AMX cluster)", True),
                  item(8.1, NOD_M1MAX, "power during that matmul benchmark (laptop, plugged in)", True))}


def af_source(chip):
    return f"{AF_RUN[chip]} (ANEForge roofline suite, {AF_WHAT[chip]})"


# --- ANE throughput and power --------------------------------------------------------------

M4_ANE_PEAK = "https://github.com/maderix/ANE/pull/50 (M4/M5 Max ANE peak 19.27 TFLOPS fp16 measured)"
M3_ANE_TOPS = "https://www.macrumors.com/2023/10/31/apple-m3-pro-less-memory-bandwidth/ (M3 Neural Engine 18 TOPS per Apple)"


# Core ML reaches one die's ANE on an Ultra (two Max dies, two 16-core ANEs): parallel Core ML
# models on M1 and M3 Ultras gained no ANE bandwidth over the Max (anemll-bench #8); both ANEs are
# in the hardware (ioreg lists ane0 and ane2 on an M1 Ultra, jundot/omlx #2781), but only the
# private ANE runtime with programs pinned to each instance uses both (jundot/omlx PR #2756).
ULTRA_SOURCES = ("https://github.com/Anemll/anemll-bench/issues/8 (M1 and M3 Ultra: parallel Core ML models show no "
                 "ANE bandwidth increase) ; https://github.com/jundot/omlx/issues/2781 (M1 Ultra ioreg: two 16-core "
                 "ANEs, one per die) ; https://github.com/jundot/omlx/pull/2756 (both ANEs only through the private "
                 "ANE runtime, programs pinned to each physical ANE)")
ULTRA_NOTE = ("; Core ML uses one die's ANE: parallel Core ML models on M1/M3 Ultras gained no ANE bandwidth "
              "(anemll-bench #8), and the second ANE is reached only by the private runtime with per-instance "
              "pinning (oMLX), which npumoe does not use")


def ane_tflops(chip):
    v = _ane_tflops(chip)
    if chip.endswith("-ultra"):
        v = {**v, "source": v["source"] + " ; " + ULTRA_SOURCES, "note": v.get("note", "") + ULTRA_NOTE}
    return v


def _ane_tflops(chip):
    if chip in ANE_GFLOPS:
        g = ANE_GFLOPS[chip]
        return item(mean(g) / 1e3, af_source(chip),
                    f"mean of the fp16 GEMM rates at N=2048 ({g[0]/1e3:.2f}) and N=4096 ({g[1]/1e3:.2f}) TFLOP/s"
                    + ("; measured on battery" if chip == "m5" else ""))
    same = {"m1-pro": "m1-max", "m1-ultra": "m1-max", "m2-ultra": "m2-max"}
    if chip in same:
        src = same[chip]
        v = _ane_tflops(src)
        return item(v["value"], af_source(src),
                    f"not measured; same 16-core ANE as {src} (anemll-bench shows the same ANE bandwidth across "
                    f"Pro/Max/Ultra of a generation), so {src}'s measured rate")
    if chip == "m2":
        a, b = mean(ANE_GFLOPS["m2-pro"]) / 1e3, mean(ANE_GFLOPS["m2-max"]) / 1e3
        return item((a + b) / 2, af_source("m2-pro") + " ; " + af_source("m2-max"),
                    f"not measured; mean of the two measured M2-generation ANEs (M2 Pro {a:.2f}, M2 Max {b:.2f} TFLOP/s)")
    if chip.startswith("m3"):
        ref = "m4-max" if chip in ("m3-max", "m3-ultra") else "m4"
        r = mean(ANE_GFLOPS[ref]) / 1e3
        return item(r * 18 / 19, af_source(ref) + " ; " + M3_ANE_TOPS + " ; " + M4_ANE_PEAK,
                    f"not measured; {ref}'s measured {r:.2f} TFLOP/s x 18/19 (M3 ANE 18 TOPS fp16 vs M4 ~19 TFLOPS fp16 peak); "
                    f"{'same ANE-bandwidth tier as M4 Max (anemll-bench: M3 Max 120 GB/s)' if ref == 'm4-max' else 'base ANE-bandwidth tier (M3 Pro unmeasured: conservative)'}")
    raise KeyError(chip)


def ane_power(chip):
    if chip in ANE_MW:
        w = ANE_MW[chip]
        return item(mean(w) / 1e3, af_source(chip),
                    f"powermetrics ANE rail during the GEMM loop, mean of N=2048 ({w[0]/1e3:.2f} W) and N=4096 ({w[1]/1e3:.2f} W)")
    same = {"m1-pro": "m1-max", "m1-ultra": "m1-max", "m2-ultra": "m2-max",
            "m3": "m4", "m3-pro": "m4", "m3-max": "m4-max", "m3-ultra": "m4-max"}
    if chip in same:
        src = same[chip]
        return item(mean(ANE_MW[src]) / 1e3, af_source(src),
                    f"not measured; {src}'s measured ANE rail power (same ANE class, see ane_tflops)")
    if chip == "m2":
        a, b = mean(ANE_MW["m2-pro"]) / 1e3, mean(ANE_MW["m2-max"]) / 1e3
        return item((a + b) / 2, af_source("m2-pro") + " ; " + af_source("m2-max"),
                    f"not measured; mean of M2 Pro ({a:.2f} W) and M2 Max ({b:.2f} W) ANE rail power")
    raise KeyError(chip)


def ane_bw(chip):
    if chip in ANE_BW:
        return item(ANE_BW[chip], ANEMLL, "measured on the Ultra: the Max's ANE bandwidth, one die's ANE (see ane_tflops)"
                    if chip.endswith("-ultra") else None)
    if chip == "m3-ultra":
        return item(120.60, "https://github.com/Anemll/anemll-bench/issues/8 (M3 Ultra llama_lm_head 120.6 GB/s)",
                    "the M3 Max's ANE bandwidth: one die's ANE (see ane_tflops)")
    if chip == "m3-pro":
        return item(ANE_BW["m3"], ANEMLL, "not measured; M3 base value (63.10 GB/s), the conservative tier of the M3 generation")
    raise KeyError(chip)


# --- GPU -------------------------------------------------------------------------------------


def gpu_eff():
    """MLX fp16 GEMM rate / peak on the chips measured with a known peak."""
    rows = []
    for chip in ("m1", "m2-pro", "m4-max"):
        peak_top, _ = GPU_PEAK[chip]
        peak = peak_top * GPU_CORES_MEASURED[chip] / GPU_CORES[chip]
        rows.append((chip, mean(GPU_GFLOPS[chip]) / peak))
    return sum(r for _, r in rows) / len(rows), rows


EFF, EFF_ROWS = gpu_eff()
EFF_TXT = ", ".join(f"{c} {r:.3f}" for c, r in EFF_ROWS)


DB = "https://github.com/chsasank/device-benchmarks"
CROSS = {  # public torch-MPS matmul measurements, a cross-check of derived GPU numbers (not MLX, so not used)
    "m1-pro": f"; cross-check: torch MPS fp16 matmul 4.3 TFLOPS on a 16-core M1 Pro ({DB} README)",
    "m2-ultra": f"; cross-check: torch MPS fp32 matmul 20 TFLOPS on a 76-core M2 Ultra ({DB} README)",
    "m3-max": f"; cross-check: torch MPS fp32 matmul 11.4 TFLOPS at N=4096 on a 40-core M3 Max ({DB}/pull/7)",
}


def gpu_tflops(chip):
    out = _gpu_tflops(chip)
    if chip in CROSS:
        out["note"] += CROSS[chip]
    return out


def _gpu_tflops(chip):
    if chip in GPU_GFLOPS:
        g = GPU_GFLOPS[chip]
        n_m, n = GPU_CORES_MEASURED[chip], GPU_CORES[chip]
        base = f"MLX fp16 GEMM, mean of N=2048 ({g[0]/1e3:.2f}) and N=4096 ({g[1]/1e3:.2f}) TFLOP/s on {n_m} GPU cores"
        if n_m == n:
            return item(mean(g) / 1e3, af_source(chip), base)
        return item(mean(g) / 1e3 * n / n_m, af_source(chip), base + f", scaled x {n}/{n_m} to the top bin's {n} cores")
    if chip == "m5":
        return item(2 * 1280**3 / 0.646e-3 / 1e12, "https://github.com/ml-explore/mlx/issues/3196 (M5, MLX 0.31.0, 1280x1280 bf16 matmul 0.646 ms)",
                    "2*1280^3 FLOP / 0.646 ms; MLX with M5 GPU neural accelerators; a small GEMM, so likely below what larger ones reach",
                    single=True, uncertain=M5_GPU_UNCERTAIN)
    if chip == "m3":
        peak = 14320 / 40 * 10
        return item(peak * EFF / 1e3, HMC_M3MAX + " ; " + AF,
                    f"not measured; peak {peak/1e3:.2f} TFLOPS (M3 Max per-core rate x 10 cores, same 1398 MHz) x MLX efficiency {EFF:.3f} "
                    f"(mean of measured MLX GEMM / peak: {EFF_TXT}, ANEForge)")
    if chip in GPU_PEAK:
        peak, src = GPU_PEAK[chip]
        return item(peak * EFF / 1e3, src + " ; " + AF,
                    f"not measured; peak {peak/1e3:.2f} TFLOPS x MLX efficiency {EFF:.3f} (mean of measured MLX GEMM / peak: {EFF_TXT}, ANEForge)"
                    + ("; M3 Ultra = 2 x M3 Max dies" if chip == "m3-ultra" else ""))
    if chip == "m3-ultra":
        peak = 2 * GPU_PEAK["m3-max"][0]
        return item(peak * EFF / 1e3, HMC_M3MAX + " ; " + AF,
                    f"not measured; 2 x M3 Max peak ({peak/1e3:.2f} TFLOPS, two M3 Max dies) x MLX efficiency {EFF:.3f} ({EFF_TXT}, ANEForge)")
    raise KeyError(chip)


def gpu_power(chip):
    # same-generation, same-tier measured reference for a per-core scaling
    ref = {
        "m1": "m1", "m1-pro": "m1", "m1-max": "m1", "m1-ultra": "m1",
        "m2": "m2-pro", "m2-pro": "m2-pro", "m2-max": "m2-pro", "m2-ultra": "m2-pro",
        "m3": "m4", "m3-pro": "m4-pro", "m3-max": "m4-max", "m3-ultra": "m4-max",
        "m4": "m4", "m4-pro": "m4-pro", "m4-max": "m4-max", "m5": "m4",
    }[chip]
    w = GPU_MW[ref]
    n_m, n = GPU_CORES_MEASURED[ref], GPU_CORES[chip]
    per_core = mean(w) / 1e3 / n_m
    base = (f"powermetrics GPU rail during the MLX GEMM loop on {ref} ({n_m} cores), mean of N=2048 ({w[0]/1e3:.1f} W) "
            f"and N=4096 ({w[1]/1e3:.1f} W)")
    if ref == chip and n == n_m:
        return item(mean(w) / 1e3, af_source(ref), base)
    how = "scaled" if ref == chip else "not measured; derived:"
    return item(per_core * n, af_source(ref),
                f"{how} {base} = {per_core:.3f} W/core x {n} cores (keeps J/FLOP of the measured chip)")


MOE_KERNELS = 10


def gpu_dispatch(chip):
    per_kernel = 8.8e-3 / 3200
    v = MOE_KERNELS * per_kernel + 20e-6
    return item(v, MLX_KERNEL + " (M3 Ultra, mlx 0.32.2)",
                f"derived: {MOE_KERNELS} kernels per MoE layer call (mlx_lm SwitchGLU with sorting: 2 argsort, 2 gathers, "
                f"3 gather_mm, activation, unsort, weighted sum) x 2.75 us (3,200 tiny dependent kernels in 8.8 ms) "
                f"+ one command-buffer boundary (~20 us); measured on M3 Ultra, used for every chip", single=True)


def sync(chip):
    return item(180e-6, MLX_SYNC + " ; https://github.com/ml-explore/mlx/issues/2132",
                "a CPU<->GPU crossing with MLX's default fence ~180 us (M3 Ultra, mlx 0.32.2); np.asarray of a small "
                "MLX result 179 us in #2132; used for every chip", single=True)


def ane_dispatch(chip):
    return item(0.38e-3, COREML_PREDICT,
                "Core ML CPU_AND_NE predict of a 1.4M-FLOP model, 0.38 ms after buffer reuse (so ~all fixed cost), "
                "on an M5-family Mac (the project targets M5 and later); the issue quotes public measurements near "
                "0.2 ms; used for every chip", single=True)


def both_bw(chip):
    return item(1.2, LARQL,
                "ANE-3: GPU+ANE together deliver 1.20-1.24x the GPU alone (shared memory bandwidth); lower end, used for every chip",
                single=True)


def gpu_bw(chip):
    v, src = GPU_BW[chip]
    return item(v, src)


def build():
    chips = {}
    for c in CHIPS:
        chips[c] = {
            "ane_tflops": ane_tflops(c),
            "ane_bw_gbs": ane_bw(c),
            "ane_dispatch_s": ane_dispatch(c),
            "ane_power_w": ane_power(c),
            "gpu_tflops": gpu_tflops(c),
            "gpu_bw_gbs": gpu_bw(c),
            "gpu_dispatch_s": gpu_dispatch(c),
            "gpu_power_w": gpu_power(c),
            "sync_s": sync(c),
            "both_bw_factor": both_bw(c),
        }
        if c in CPU:
            chips[c]["cpu_tflops"], chips[c]["cpu_power_w"] = CPU[c]
    return {"format": 1, "chips": chips}


if __name__ == "__main__":
    out = build()
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    for c, e in out["chips"].items():
        print(c, {k: v["value"] for k, v in e.items()})


# --- benchmarks/chips.md ------------------------------------------------------------------

MD_HEAD = """# Apple chip profiles

The planner predicts ANE (Core ML program) and GPU (MLX) time and energy from these numbers
when it plans for a chip it is not running on (`--chip CHIP` on `plan`, `build`, `replay`);
on a Mac, `npumoe tune` measures instead. They live in `npumoe_mlx/data/chips.json`, every
number with its public source, and a number derived from others says how in its note.
`npumoe chips` prints this table; `npumoe chips --chip "M2 Max"` prints one chip's sources.
A user can override any number with their own file (`npumoe chips --file my-chips.json`
checks it; the loader refuses a file with a missing, non-positive or unsourced number).

Each profile describes the top configuration of its chip (most GPU cores, highest memory
bandwidth); a binned part (e.g. 30-core-GPU M3 Max, 300 GB/s) is slower on the GPU side.

## Table (SI units; `u` = microseconds)

"""

MD_METHOD = """
## How each column was obtained

| column | what | method and main sources |
|---|---|---|
| `ane_tflops` | fp16 FLOP/s the ANE achieves on large GEMMs | ANEForge roofline suite (sbryngelson/ANEForge `bench/results/rooflines/*.json`, `device_saturation_sweep`): one square fp16 GEMM compiled for the ANE, min latency; the mean of N=2048 and N=4096, the sizes of our expert GEMMs (D 2048-4096). Measured on M1, M1 Max, M2 Pro, M2 Max, M4, M4 Pro, M4 Max, M5. These are 14-35% of Apple's TOPS figures; the marketing peak (~19 TFLOPS fp16 on M4, maderix/ANE) is reached only by wide, chained programs. |
| `ane_bw_gbs` | DRAM bandwidth the ANE reaches | Anemll/anemll-bench `Results.MD` (llama_lm_head, a weight-streaming program); M3 Ultra from anemll-bench issue #8. |
| Ultras | one die's ANE | An Ultra is two Max dies with two 16-core ANEs (ioreg on an M1 Ultra lists `ane0` and `ane2`, jundot/omlx #2781), but Core ML places work on one: parallel Core ML models on M1 and M3 Ultras gained no ANE bandwidth over the Max (anemll-bench #8: M3 Ultra 120.6 GB/s, M3 Max 120.2; M1 Ultra 54.7, M1 Max 54.6; M2 Ultra 61.7, M2 Max 62.0). Only the private ANE runtime with programs pinned to each instance uses both (oMLX's dual-ANE prefill, jundot/omlx PR #2756). npumoe runs Core ML, so the Ultra profiles take the Max's ANE numbers. |
| `copy_bps` (cost model, not per chip) | host copies of a program's rows in and out | 50 GB/s for every chip: one CPU core's memcpy, 50.5 GB/s on an M2 Max (whisper.cpp #89 `bench` memcpy, 1 thread); lower on other chips: M3 Ultra 47.9 GB/s (tinymembench C copy, geerlingguy/sbc-reviews #95), M1 Ultra 36.6 GB/s (whisper.cpp #89). |
| `ane_dispatch_s` | fixed cost of one Core ML program call | aosama/astronomical #540: a Core ML `CPU_AND_NE` predict of a 1.4M-FLOP model takes 0.38 ms after buffer reuse (the issue quotes public measurements near 0.2 ms). Same for every chip. |
| `ane_power_w` | ANE power while busy | powermetrics ANE rail in the same ANEForge runs, mean of N=2048 and N=4096 (2.1-6.3 W; maderix/ANE quotes ~2-2.8 W on smaller work). |
| `gpu_tflops` | fp16 FLOP/s of MLX matmuls | Same ANEForge runs, GPU = MLX `x @ W` (fp16), mean of N=2048 and N=4096: measured on M1 (7-core), M2 Pro (16-core), M4 (8-core), M4 Pro (20-core), M4 Max (32-core), scaled by core count to the top bin. Other chips: peak fp16 (philipturner/metal-benchmarks for M1/M2, hmc-tech.com for M3/M4) x the measured MLX efficiency (MLX GEMM / peak, mean over M1, M2 Pro and M4 Max = EFF). M5: ml-explore/mlx #3196 (1280x1280 bf16 matmul 0.646 ms, with the M5 GPU neural accelerators). |
| `gpu_bw_gbs` | unified-memory bandwidth | Apple's announced figure, from pages quoting the announcement (MacRumors, 9to5Mac, Neowin, TechPowerUp, ...). |
| `gpu_dispatch_s` | fixed cost of one MoE layer's MLX kernels | ml-explore/mlx #4521 (M3 Ultra): 3,200 tiny dependent kernels in 8.8 ms (2.75 us each) and ~20 us per command-buffer boundary; x 10 kernels of mlx_lm's SwitchGLU (sorted path) + one boundary = 47.5 us. Same for every chip. |
| `gpu_power_w` | GPU power under MLX GEMMs | powermetrics GPU rail in the same ANEForge runs, mean of N=2048 and N=4096; other chips: W per GPU core of the same generation and tier x cores (keeps the measured J/FLOP). A real LLM prefill can draw less (17.4-18.1 W on an M1 Max at pp512, Quitetall/tritium #6), decode much less. |
| `sync_s` | one host sync (MLX eval -> numpy) | ml-explore/mlx #4438: a CPU<->GPU crossing with MLX's default fence ~180 us (M3 Ultra, mlx 0.32.2); #2132: `np.asarray` of a small MLX result 179 us. Same for every chip. |
| `both_bw_factor` | ANE + GPU together vs the GPU alone | chrishayuk/larql PR #312 (ANE-3): GPU+ANE deliver 1.20-1.24x the GPU alone; they share DRAM. 1.2 for every chip. |
"""


BOUNDS_HEAD = """
## What the profiles allow (ideal bounds, compute-bound expert GEMMs)

Splitting a layer's expert FLOPs W between the two units that run at once, with no
dispatch, sync or bandwidth limits: the best makespan is `W / (ANE + GPU)`, i.e.
`GPU / (ANE + GPU)` of all-on-GPU; the least energy at no more than 1.2x the all-GPU time
puts a share `f = min(1, 1.2 ANE/GPU)` on the ANE. Real plans land above these bounds
(per-call overheads, padding, the 1.2x shared-bandwidth ceiling when memory-bound). Where a
bound is above a target (e.g. makespan <= 0.8x on the Ultras, whose GPU is 4-5x their one
Core ML-visible ANE), no planner can meet it with these numbers.
"""


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPLAY_JSON = os.path.join(ROOT, "benchmarks", "results", "replay.json")
TOP_K = {"qwen3-30b-a3b": 8, "mixtral-8x7b": 2}  # routed experts per token of the shape's traces
SHORT = {"qwen3-30b-a3b": "Qwen3", "mixtral-8x7b": "Mixtral"}


def cost_model_bounds(cost, D, H, k, tokens=2048):
    """What the best split of one layer call's pairs between the programs and MLX can reach under
    the planner's own cost model, with no padding and one program call (so: the sync, one
    dispatch, MLX's fixed cost and the host copies included): (time / all-on-GPU, least energy /
    all-on-GPU within 1.2x that best time, least energy within 1.2x all-on-GPU's time)."""
    import numpy as np

    from npumoe_mlx.planning.cost import flops_per_row

    P, f = tokens * k, flops_per_row(D, H)
    x = np.linspace(0.0, 1.0, 20001)  # share of the pairs on programs
    mlx = np.where(x < 1, cost.mlx_fixed_s + (1 - x) * P * f / cost.mlx_flops, 0.0)
    prog = np.where(x > 0, cost.sync_s + cost.dispatch_s + x * P * (f / cost.program_flops + D * 8 / cost.copy_bps), 0.0)
    span, alone = np.maximum(mlx, prog), mlx[0]
    joules = (np.where(x > 0, cost.program_j_per_call + x * P * f * cost.program_j_per_flop, 0.0)
              + np.where(x < 1, cost.mlx_j_per_call + (1 - x) * P * f * cost.mlx_j_per_flop, 0.0))
    return (span.min() / alone, joules[span <= 1.2 * span.min()].min() / joules[0],
            joules[span <= 1.2 * alone].min() / joules[0])


def ideal_bounds(r):
    """Throughput-only bounds (compute-bound GEMMs, no fixed costs): best makespan / all-GPU, and the
    least energy / all-GPU within 1.2x of that makespan and within 1.2x all-GPU's time."""
    a, g = r.ane_tflops, r.gpu_tflops
    ja, jg = r.ane_power_w / a, r.gpu_power_w / g

    def energy(f):
        return (f * ja + (1 - f) * jg) / jg

    return g / (a + g), energy(min(1.0, 1.2 * a / (a + g))), energy(min(1.0, 1.2 * a / g))


def _verdict(preds, ideal, models, target, shapes):
    """'met', or per shape that misses: which bound already exceeds the target, else the planner."""
    if max(preds) <= target:
        return "**met**"
    if ideal > target:
        return f"not met: no split can (ideal bound {ideal:.3f})"
    why = []
    for s, p, m in zip(shapes, preds, models):
        if p <= target:
            continue
        why.append(f"{SHORT[s]}: " + (f"fixed costs and host copies (cost-model bound {m:.3f})" if m > target
                                       else f"**the planner ({p:.3f}; cost-model bound {m:.3f})**"))
    return "not met: " + "; ".join(why)


def builds(shape):
    """(ok, one line): whether the Core ML builder accepts the largest group the planner allows at
    this shape (default weight format, 4-bit MLX source), by the same rules the builds check:
    a layout whose axes fit, H chunks, weights per program. Only shapes that build are predicted."""
    from ane_kernels.coreml import choose_layout, h_chunks
    from ane_kernels.formats import expert_bytes
    from ane_kernels.limits import DEFAULT_LIMITS
    from ane_kernels.spec import random_spec
    from npumoe_mlx.cli import replay as rp
    from npumoe_mlx.planning.plan import PlanLimits, group_cap

    sh, E = rp.preset_shape(shape), rp.load_shape_presets()[shape]["experts"]
    lim = PlanLimits.for_backend("coreml")
    G = group_cap(E, sh["D"], sh["H"], {"bits": 4, "group_size": 64}, lim)
    layout = choose_layout(G, sh["D"], sh["H"])
    wbytes = G * expert_bytes(lim.weight_format, sh["D"], sh["H"])
    if layout is None or wbytes > DEFAULT_LIMITS.max_weight_bytes:
        return False, f"{SHORT[shape]}: no group builds (G={G}, layout {layout}, {wbytes / 1e6:.0f} MB)"
    probe = random_spec(G=1, D=32, H=32, tiers=(32,))
    probe.expert_ids, probe.D, probe.H = tuple(range(G)), sh["D"], sh["H"]  # the shape is all h_chunks reads
    n = len(h_chunks(probe, layout))
    return True, (f"{SHORT[shape]} (D={sh['D']}, H={sh['H']}): up to {G} experts per program, {layout} layout, "
                  f"H in {n} chunk{'s' if n > 1 else ''}, {wbytes / 1e6:.0f} MB of {lim.weight_format} weights")


def targets_md(rows, results_path=REPLAY_JSON):
    """Issue 10's chip targets, per chip: the planner's predictions on the shared traces
    (worst trace of each shape), the bounds, met or not and why."""
    import json

    from npumoe_mlx.cli import replay as rp
    from npumoe_mlx.backends.registry import chip_cost

    if not os.path.exists(results_path):
        return ""
    res = json.load(open(results_path))
    pred = {}  # (chip, shape, objective, bound) -> (worst time ratio, worst energy ratio, worst time / reference)
    for r in res["results"]:
        if r["kind"] != "chip":
            continue
        s = r["summary"]["2048"]
        key = (r["chip"], r["shape"], r["objective"], r["energy_bound"])
        pred.setdefault(key, []).append((s["time_ratio"], s["energy_ratio"], s["predicted_s"],
                                         s["program_calls_per_call"], s["padding_pct"], r["calibrate"][0]))
    ref_t = {k[:2]: [p[2] for p in v] for k, v in pred.items() if k[2] == "time"}
    built = {s: builds(s) for s in TOP_K}
    shapes = [s for s in TOP_K if any(k[1] == s for k in pred) and built[s][0]]
    if not shapes:
        return ""
    out = [TARGETS_HEAD.format(seconds=res.get("seconds", "?"), machine=res.get("machine", "?"))]
    out.append("Shapes predicted only where the Core ML builder accepts the planner's groups "
               "(`builds`; tests/test_coreml_path.py builds them off-Mac):\n")
    out += [f"- {'builds' if ok else 'not predicted'}: {line}" for ok, line in built.values()] + [""]
    tables = {
        "time": ["| chip | predicted time / all-GPU, worst trace (" + " / ".join(SHORT[s] for s in shapes)
                 + ") | ideal bound | cost-model bound (" + " / ".join(SHORT[s] for s in shapes) + ") | target <= 0.8 |",
                 "|---|---|---|---|---|"],
        "time-bound": ["| chip | predicted energy / all-GPU (" + " / ".join(SHORT[s] for s in shapes)
                       + ") | its time / the time objective's, worst | ideal bound | cost-model bound | target <= 0.5 |",
                       "|---|---|---|---|---|---|"],
        "gpu-bound": ["| chip | predicted energy / all-GPU (" + " / ".join(SHORT[s] for s in shapes)
                      + ") | its time / all-GPU, worst | ideal bound | cost-model bound | target <= 0.5 |",
                      "|---|---|---|---|---|---|"],
    }
    counts = {k: 0 for k in tables}
    gaps = []  # planner misses: the worst trace, and the cost-model bound with its own program calls per call
    for r in rows:
        if not all((r.name, s, "time", "time") in pred for s in shapes):
            continue
        ideal = ideal_bounds(r)
        model = []
        for s in shapes:
            sh = rp.preset_shape(s)
            model.append(cost_model_bounds(chip_cost(r.name, "coreml", sh["D"], sh["H"]), sh["D"], sh["H"], TOP_K[s]))
        t = [max(p[0] for p in pred[(r.name, s, "time", "time")]) for s in shapes]
        v = _verdict(t, ideal[0], [m[0] for m in model], 0.8, shapes)
        counts["time"] += v == "**met**"
        tables["time"].append(f"| {r.name} | {' / '.join(f'{x:.3f}' for x in t)} | {ideal[0]:.3f} | "
                              f"{' / '.join(f'{m[0]:.3f}' for m in model)} | {v} |")
        for name, bound, i in (("time-bound", "time", 1), ("gpu-bound", "gpu", 2)):
            e = [max(p[1] for p in pred[(r.name, s, "energy", bound)]) for s in shapes]
            if bound == "time":  # the energy plan's time over the time plan's, per trace
                tt = max(pe[2] / pt for s in shapes
                         for pe, pt in zip(pred[(r.name, s, "energy", bound)], ref_t[(r.name, s)]))
            else:
                tt = max(pe[0] for s in shapes for pe in pred[(r.name, s, "energy", bound)])
            v = _verdict(e, ideal[i], [m[i] for m in model], 0.5, shapes)
            counts[name] += v == "**met**"
            for s, ev, mb in zip(shapes, e, model):
                if ev > 0.5 and mb[i] <= 0.5 and ideal[i] <= 0.5:
                    w = max(pred[(r.name, s, "energy", bound)], key=lambda p: p[1])
                    sh = rp.preset_shape(s)
                    c = chip_cost(r.name, "coreml", sh["D"], sh["H"])
                    c.program_j_per_call *= w[3]
                    c.dispatch_s *= w[3]  # one Core ML dispatch per program call the plan makes
                    nb = cost_model_bounds(c, sh["D"], sh["H"], TOP_K[s])[i]
                    gaps.append(f"| {r.name} | {SHORT[s]} ({w[5]}) | `--energy-bound {bound}` | {ev:.3f} | {mb[i]:.3f} | "
                                f"{w[3]:.1f} | {nb:.3f} | {w[4]:.1f} |")
            tables[name].append(f"| {r.name} | {' / '.join(f'{x:.3f}' for x in e)} | {tt:.2f} | {ideal[i]:.3f} | "
                                f"{' / '.join(f'{m[i]:.3f}' for m in model)} | {v} |")
    n = len(tables["time"]) - 2
    out.append(f"### Time objective: makespan <= 0.8 x all-on-GPU (met on {counts['time']} of {n})\n")
    out += tables["time"]
    out.append(f"\n### Energy objective, within 1.2x of the time objective's makespan (`--energy-bound time`, "
               f"the default): energy <= 0.5 x all-on-GPU (met on {counts['time-bound']} of {n})\n")
    out += tables["time-bound"]
    out.append(f"\n### Energy objective, within 1.2x of all-on-GPU's time (`--energy-bound gpu`): energy <= 0.5 x "
               f"all-on-GPU (met on {counts['gpu-bound']} of {n})\n")
    out += tables["gpu-bound"]
    if gaps:
        out.append(GAPS_HEAD)
        out += ["| chip | shape (worst trace) | energy bound | predicted energy / all-GPU | cost-model bound, 1 call "
                "| program calls per layer call | cost-model bound with that many calls | padding % |",
                "|---|---|---|---|---|---|---|---|"] + gaps
    return "\n".join(out) + "\n"


GAPS_HEAD = """
### The misses marked "the planner"

The cost-model bound above lets the programs' share run as one Core ML call with no padding.
A plan makes one call per resident group (groups of similar load pad little; one group for
all experts would pad to the busiest one), and each call costs a dispatch (380 us). With the
plan's own number of calls the bound rises, and the rest of the gap is padding (Core ML tiers
are multiples of 32 rows) and groups that cannot be cut finer than their ladder:
"""


TARGETS_HEAD = """
## Issue 10's chip targets (predicted)

For every profile, on the shared routing traces (`benchmarks/routing`: the OLMoE traces at the
Qwen3-30B-A3B expert shape, the five Mixtral traces at the Mixtral-8x7B shape), 2048-token calls,
`--split half`, Core ML programs on the ANE against MLX on the GPU: each cell is the worst trace
of that shape. Predictions of the planner's cost model with this table's numbers, not
measurements. Regenerate (the replays take ~3-5 minutes on 2 cores):

```sh
PYTHONPATH=. python benchmarks/replay_all.py --routing benchmarks/routing   # -> benchmarks/results/replay.json
python benchmarks/build_chips.py npumoe_mlx/data/chips.json benchmarks/chips.md
```

Two bounds say what any plan could do, so a miss can be told apart from a planner fault:

- **ideal bound**: throughput alone (see "What the profiles allow" above): the expert FLOPs split
  between two units running at once, no fixed costs; the same for both shapes.
- **cost-model bound**: the best split of one layer call's pairs under the planner's own cost
  model, as if the programs' share ran in one program call with no padding: the host sync
  (180 us), one Core ML dispatch (380 us), MLX's fixed cost and the host copies of the rows
  (`copy_bps`, 50 GB/s, the coreml default: one core's memcpy, see above) included. Real plans need several program calls
  (one per group) and pad their tiers, so they land above it.

"not met" says which bound already exceeds the target (per shape where they differ); a miss
where both bounds allow the target is the planner's, in bold. The "its time" columns: an energy
call ends within its plan's slack x the fastest that plan gives it (1.2x all-on-GPU for `gpu`);
for `time` the slack is fitted on the calibration half, from the least time ratio over 8 parts of
it, so the plan ends within 1.2x the time objective's plan there; on the replayed half every
energy replay ends within 1.2x too (worst 1.197x, m5; with the mean ratio it reached 1.217x).

Run: {seconds} s on {machine}.
"""


def write_md(path, data):
    sys.path.insert(0, ROOT)
    from npumoe_mlx.planning.chips import ChipProfile, FIELDS, format_chips

    rows = []
    for name, e in data["chips"].items():
        rows.append(ChipProfile(name=name, sources={f: e[f]["source"] for f in FIELDS},
                                **{f: e[f]["value"] for f in FIELDS}))
    lines = [MD_HEAD + format_chips(rows) + "\n", MD_METHOD.replace("EFF", f"{EFF:.3f} ({EFF_TXT})")]
    lines.append(BOUNDS_HEAD)
    lines.append("| chip | ANE / GPU FLOP/s | best makespan / all-GPU | best energy / all-GPU at <= 1.2x its time | ANE pJ/FLOP | GPU pJ/FLOP |")
    lines.append("|---|---|---|---|---|---|")
    for r in rows:
        a, g = r.ane_tflops, r.gpu_tflops
        f = min(1.0, 1.2 * a / g)
        e = (f * r.ane_power_w / a + (1 - f) * r.gpu_power_w / g) / (r.gpu_power_w / g)
        lines.append(f"| {r.name} | {a / g:.2f} | {g / (a + g):.2f} | {e:.2f} | {r.ane_power_w / a:.2f} | {r.gpu_power_w / g:.2f} |")
    lines.append(targets_md(rows))
    lines.append("\n## Derived numbers (no direct public measurement of that number on that chip)\n")
    lines.append("Measured once (on one chip) and used for every chip: `ane_dispatch_s`, `sync_s`, "
                 "`both_bw_factor`; `gpu_dispatch_s` is derived from a per-kernel measurement (see above). "
                 "Per chip, the numbers derived from other chips (rule in each note below):\n")
    shared = ("ane_dispatch_s", "gpu_dispatch_s", "sync_s", "both_bw_factor")
    for name, e in data["chips"].items():
        derived = [f"{f} ({'scaled to the top bin' if e[f].get('note', '').startswith('scaled') or 'scaled x' in e[f].get('note', '') else 'derived'})"
                   for f in FIELDS if f not in shared and
                   ("not measured" in e[f].get("note", "") or "scaled" in e[f].get("note", ""))]
        lines.append(f"- **{name}**: " + (", ".join(derived) if derived else "none"))
    lines.append("\n## Every number with its source\n")
    for name, e in data["chips"].items():
        lines.append(f"<details><summary>{name}</summary>\n")
        for f in FIELDS:
            note = f" — {e[f]['note']}" if e[f].get("note") else ""
            lines.append(f"- `{f}` = {e[f]['value']:g} {FIELDS[f][0]}: {e[f]['source']}{note}")
        lines.append("\n</details>\n")
    with open(path, "w") as fh:
        fh.write("\n".join(lines).rstrip() + "\n")


if __name__ == "__main__" and len(sys.argv) > 2:
    write_md(sys.argv[2], build())
