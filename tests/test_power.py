"""Unit power for the cost model's energy terms: powermetrics parsing, tune's measurement and
its fallback to the chip table, and the energy terms carried by tune's JSON into --cost."""

import sys

import numpy as np
import pytest

from npumoe_mlx.build import tune
from npumoe_mlx.build.args import load_cost
from npumoe_mlx.cli.replay import cost_for, replay
from npumoe_mlx.planning import power
from npumoe_mlx.planning.chips import chip_profile
from npumoe_mlx.planning.cost import CostModel, flops_per_row
from npumoe_mlx.planning.plan import PlanLimits
from npumoe_mlx.tools import meters


def _sample(elapsed_ns, cpu_mw, gpu_mw, ane_mw, hw="Mac14,14"):
    """One ``powermetrics -f plist`` sample in the documented layout (see npumoe_mlx/planning/power.py):
    top-level ``elapsed_ns`` and a ``processor`` dict with ``*_energy`` (mJ over the sample) and
    ``*_power`` (mW), in the order a real capture lists them."""
    e = lambda mw: int(round(mw * elapsed_ns / 1e9))  # noqa: E731
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
<key>is_delta</key><true/>
<key>elapsed_ns</key><integer>{elapsed_ns}</integer>
<key>hw_model</key><string>{hw}</string>
<key>processor</key>
<dict>
<key>clusters</key>
<array>
</array>
<key>cpu_energy</key>
<integer>{e(cpu_mw)}</integer>
<key>cpu_power</key>
<real>{cpu_mw}</real>
<key>gpu_energy</key>
<integer>{e(gpu_mw)}</integer>
<key>gpu_power</key>
<real>{gpu_mw}</real>
<key>ane_energy</key>
<integer>{e(ane_mw)}</integer>
<key>ane_power</key>
<real>{ane_mw}</real>
<key>combined_power</key>
<real>{cpu_mw + gpu_mw + ane_mw}</real>
</dict>
<key>thermal_pressure</key><string>Nominal</string>
</dict>
</plist>
""".encode()


# The processor block of a real M2 Ultra capture (graelo/pumas tests/data/powermetrics-output-m2ultra.xml,
# Mac14,14, macOS 23E224; its clusters trimmed): elapsed_ns 1023721416, cpu_power 835.188 mW,
# gpu_power 70924.6 mW, ane_power 0, combined_power 71759.8 mW (gpu_energy 72607 mJ = 70924.6 mW x 1.0237 s).
REAL = _sample(1023721416, 835.188, 70924.6, 0.0)


def test_powermetrics_plist_samples_parse_to_time_weighted_watts():
    # samples are NUL-separated plists (tlkh/asitop asitop/utils.py splits the stream on b"\x00");
    # the second one is a test value with the ANE busy; the third was cut off when powermetrics stopped
    busy = _sample(500_000_000, 1200.0, 150.0, 3300.0)
    raw = REAL + b"\x00" + busy + b"\x00" + busy[: len(busy) // 2]
    samples = power.split_samples(raw)
    assert len(samples) == 2 and samples[0]["hw_model"] == "Mac14,14"
    w = power.parse_powermetrics(samples)
    t0, t1 = 1023721416, 500_000_000
    mean = lambda a, b: (a * t0 + b * t1) / (t0 + t1) / 1000  # noqa: E731
    assert w["gpu"] == pytest.approx(mean(70924.6, 150.0))
    assert w["ane"] == pytest.approx(mean(0.0, 3300.0))
    assert w["cpu"] == pytest.approx(mean(835.188, 1200.0))
    assert w["combined"] == pytest.approx(mean(71759.788, 4650.0))
    assert power.parse_powermetrics(power.split_samples(REAL))["gpu"] == pytest.approx(70.9246)
    assert power.parse_powermetrics([]) is None
    assert power.parse_powermetrics([{"processor": {"gpu_power": 5.0}}]) is None  # no elapsed_ns: no weight
    # the whole-run energy meter of tools/ reads the same parser (no second copy)
    assert meters.parse_powermetrics is power.parse_powermetrics


def test_powermetrics_off_macos_says_why():
    if sys.platform == "darwin":
        pytest.skip("checks the message off macOS")
    cmd, why = power.powermetrics_cmd()
    assert cmd is None and why == f"powermetrics is macOS only (this is {sys.platform})"
    sampler, why2 = power.power_sampler()
    assert sampler is None and why2 == why


@pytest.mark.skipif(sys.platform != "darwin", reason=f"powermetrics exists only on macOS (this is {sys.platform})")
def test_powermetrics_measures_this_mac():
    sampler, why = power.power_sampler()
    if sampler is None:
        pytest.skip(why)  # not root: `sudo -n powermetrics` not allowed
    a = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)
    w = power.active_power(sampler, lambda: a @ a, 0.5)
    assert w is not None and w["combined"] > 0 and w["cpu"] > 0


class FakeSampler:
    """Stands in for powermetrics: the watts it would report for each region, in order."""

    def __init__(self, readings):
        self.readings = list(readings)
        self.regions = 0

    def start(self):
        pass

    def stop(self):
        self.regions += 1
        return self.readings.pop(0)


def _raw(backend="coreml", D=64, H=128):
    f = flops_per_row(D, H)
    return {  # timings consistent with 1 TFLOP/s programs, 2 TFLOP/s MLX
        "backend": backend, "D": D, "H": H, "quant": None, "dispatch_s": 3e-4,
        "programs": [(G, C, 3e-4 + G * C * f / 1e12) for G in (1, 4) for C in (16, 64, 256)],
        "mlx_fixed_s": 5e-5, "mlx": [(n, 5e-5 + n * f / 2e12) for n in (16, 128, 512)],
        "mlx_dense": [(n, 5e-5 + n * f / 2e12) for n in (16, 128, 512)],
        "sync_s": 1e-4, "copy_bytes": 1e6, "copy_s": 1e-4,
    }


def test_tune_energy_terms_come_from_measured_power_and_travel_in_its_json(tmp_path):
    calls = []
    fake = FakeSampler([{"combined": 9.0, "cpu": 2.0, "gpu": 0.5, "ane": 3.25},   # while programs run
                        {"combined": 25.0, "cpu": 2.5, "gpu": 21.0, "ane": 0.0}])  # while MLX runs
    pw = tune.unit_power("coreml", lambda: calls.append("p"), lambda: calls.append("m"), min_s=0.01,
                         make_sampler=lambda: (fake, ""))
    assert fake.regions == 2 and "p" in calls and "m" in calls
    assert (pw["program_w"], pw["mlx_w"]) == (3.25, 21.0)  # the ANE rail under programs, the GPU under MLX
    assert pw["source"].startswith("measured with powermetrics: ane 3.25 W")
    raw = {**_raw(), "power": pw}
    cost = tune.fit(raw)
    assert cost.has_energy
    assert cost.program_j_per_flop == pytest.approx(3.25 / cost.program_flops)
    assert cost.program_flops == pytest.approx(1e12, rel=1e-6)
    assert cost.mlx_j_per_flop == pytest.approx(21.0 / cost.mlx_flops)
    assert cost.program_j_per_call == pytest.approx(3.25 * cost.dispatch_s)
    assert cost.mlx_j_per_call == pytest.approx(21.0 * cost.mlx_fixed_s)
    assert "measured with powermetrics" in cost.source
    assert not tune.fit(_raw()).has_energy  # no power reading: no energy terms (not the chip's by stealth)

    # `npumoe tune --out FILE` writes what `--cost FILE` reads: the measured energy goes along
    out = tmp_path / "cost.json"
    cost.save(str(out))
    for back in (load_cost(str(out)), cost_for("coreml", None, str(out))):
        assert back.has_energy and back.mlx_j_per_flop == cost.mlx_j_per_flop
        assert back.program_j_per_call == cost.program_j_per_call


def test_energy_objective_plans_with_the_measured_watts():
    """The same timings with a cheaper ANE rail: the energy objective offloads at least as much,
    and the predicted joules follow the watts (a plan that ignored them would not move)."""
    rng = np.random.default_rng(0)
    routes = {0: rng.integers(0, 16, (4096, 2))}
    base = tune.fit(_raw(D=512, H=1024))
    costs = [tune.with_energy(CostModel.from_dict(base.to_dict()), w, 20.0) for w in (18.0, 2.0)]
    outs = [replay([routes], [routes], 512, 1024, c, PlanLimits.for_backend("coreml"), (512,), seq_len=512,
                   split="half", objective="energy", energy_bound="gpu") for c in costs]
    e = [o["summary"]["512"]["energy_ratio"] for o in outs]
    assert e[1] < e[0] - 0.05


def test_tune_falls_back_to_the_chip_table_when_powermetrics_cannot_run(monkeypatch):
    why = "powermetrics needs root: run with sudo (or allow `sudo -n powermetrics`) to measure power"
    none = lambda: (None, why)  # noqa: E731
    ran = []
    pw = tune.unit_power("coreml", lambda: ran.append(1), lambda: ran.append(1), make_sampler=none, chip="m2-max")
    c = chip_profile("m2-max")
    assert not ran  # nothing to measure with: the benchmarks are not rerun for nothing
    assert (pw["program_w"], pw["mlx_w"]) == (c.ane_power_w, c.gpu_power_w)
    assert pw["source"].startswith(why) and "m2-max" in pw["source"] and "\n" not in pw["source"]
    cost = tune.fit({**_raw(), "power": pw})
    assert cost.mlx_j_per_flop == pytest.approx(c.gpu_power_w / cost.mlx_flops)

    # this Mac's chip is found by name when not given; unknown chip or a CPU backend: no energy, said why
    monkeypatch.setattr(tune, "detect_chip", lambda: "m4-pro")
    assert tune.unit_power("coreml", None, None, make_sampler=none)["program_w"] == chip_profile("m4-pro").ane_power_w
    monkeypatch.setattr(tune, "detect_chip", lambda: None)
    pw = tune.unit_power("coreml", None, None, make_sampler=none)
    assert "program_w" not in pw and "no profile in the chip table" in pw["source"]
    assert not tune.fit({**_raw(), "power": pw}).has_energy
    pw = tune.unit_power("onnx", None, None, make_sampler=none, chip="m2-max")
    assert "program_w" not in pw and "no cpu power" in pw["source"]

    # powermetrics ran but reported no ANE rail (e.g. a machine that does not expose it): fall back too
    fake = FakeSampler([{"combined": 5.0, "cpu": 5.0, "gpu": 0.1}, {"combined": 20.0, "cpu": 1.0, "gpu": 19.0}])
    pw = tune.unit_power("coreml", lambda: None, lambda: None, min_s=0.0, make_sampler=lambda: (fake, ""),
                         chip="m2-max")
    assert pw["program_w"] == c.ane_power_w and pw["source"].startswith("powermetrics reported no ane")


def test_tune_measures_no_power_off_macos(monkeypatch):
    """Off macOS (onnx on this machine) tune measures timings only: no powermetrics, no energy."""
    if sys.platform == "darwin":
        pytest.skip("off-macOS behaviour")
    monkeypatch.setattr(tune, "unit_power", lambda *a, **k: pytest.fail("power measured off macOS"))
    raw = tune.measure("onnx", 32, 64, groups=(1,), tiers=(16,), pairs=(16,), repeats=1)
    assert "power" not in raw and not tune.fit(raw).has_energy
