"""Apple chip profiles: the shipped table, its loader's checks, name handling, detection."""

import copy
import importlib.util
import json
import os
import subprocess

import pytest

from npumoe_mlx.planning import chips
from npumoe_mlx.planning.chips import CHIP_NAMES, FIELDS, chip_profile, detect_chip, format_chips, load_chips

GENERATIONS = ("m1", "m2", "m3", "m4")
TIERS = ("", "-pro", "-max", "-ultra")


def _shipped():
    with open(chips.DEFAULT_PATH) as f:
        return json.load(f)


def _write(tmp_path, data, name="chips.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return str(p)


def test_shipped_table_has_every_chip_field_and_source():
    table = load_chips()
    expected = [g + t for g in GENERATIONS for t in TIERS if g + t != "m4-ultra"]
    assert set(expected) <= set(table), sorted(set(expected) - set(table))
    assert CHIP_NAMES == list(table)
    raw = _shipped()["chips"]
    for name, prof in table.items():
        for f in FIELDS:
            assert getattr(prof, f) > 0, (name, f)
            assert prof.sources[f].strip(), (name, f)
            # a number is either read from its source or says how it was derived
            if "not measured" in raw[name][f].get("note", ""):
                assert "http" in prof.sources[f], (name, f)
        assert prof.name == name


def test_every_source_names_a_public_place():
    for name, prof in load_chips().items():
        for f, src in prof.sources.items():
            assert "https://" in src, (name, f, src)


@pytest.mark.parametrize("spelling", ["M2 Max", "m2-max", "m2_max", "Apple M2 Max", "  m2 MAX ", "M2MAX"])
def test_name_spellings_find_the_same_chip(spelling):
    assert chip_profile(spelling).name == "m2-max"


def test_base_chip_name():
    assert chip_profile("M4").name == "m4"
    assert chip_profile("Apple M1").gpu_bw_gbs == pytest.approx(68)


def test_unknown_chip_lists_known_names_in_one_line():
    with pytest.raises(ValueError) as e:
        chip_profile("M9 Turbo")
    msg = str(e.value)
    assert "\n" not in msg
    assert "'M9 Turbo'" in msg
    for name in CHIP_NAMES:
        assert name in msg


def _corrupt(tmp_path, mutate):
    data = copy.deepcopy(_shipped())
    mutate(data)
    return _write(tmp_path, data)


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda d: d["chips"]["m3-pro"].pop("gpu_power_w"), ["m3-pro", "gpu_power_w", "missing"]),
        (lambda d: d["chips"]["m1"]["ane_tflops"].update(value=0), ["'m1'", "ane_tflops", "positive"]),
        (lambda d: d["chips"]["m4-max"]["sync_s"].update(value=-1e-4), ["m4-max", "sync_s", "positive"]),
        (lambda d: d["chips"]["m2"]["gpu_bw_gbs"].update(value="100"), ["'m2'", "gpu_bw_gbs", "positive"]),
        (lambda d: d["chips"]["m2"]["gpu_bw_gbs"].update(value=True), ["'m2'", "gpu_bw_gbs", "positive"]),
        (lambda d: d["chips"]["m5"]["gpu_power_w"].update(value=float("inf")), ["'m5'", "gpu_power_w", "positive"]),
        (lambda d: d["chips"]["m5"]["gpu_power_w"].update(value=float("nan")), ["'m5'", "gpu_power_w", "positive"]),
        (lambda d: d["chips"]["m4"]["ane_bw_gbs"].update(source="  "), ["'m4'", "ane_bw_gbs", "no source"]),
        (lambda d: d["chips"]["m4"]["ane_bw_gbs"].pop("source"), ["'m4'", "ane_bw_gbs", "no source"]),
        (lambda d: d["chips"]["m1-max"].update(gpu_tflop=1.0), ["m1-max", "unknown field", "gpu_tflop"]),
        (lambda d: d.update(format=2), ["format must be 1", "2"]),
        (lambda d: d.pop("format"), ["format must be 1"]),
        (lambda d: d.update(chips={}), ["'chips'"]),
        (lambda d: d["chips"].update({"M9 Max": d["chips"]["m1"]}), ["'M9 Max'", "m9-max"]),
    ],
)
def test_corrupted_file_is_refused_naming_file_chip_and_field(tmp_path, mutate, words):
    path = _corrupt(tmp_path, mutate)
    with pytest.raises(ValueError) as e:
        load_chips(path)
    msg = str(e.value)
    assert path in msg
    for w in words:
        assert w in msg, (w, msg)


def test_unreadable_and_non_json_files(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="nope.json.*cannot read"):
        load_chips(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.*not JSON"):
        load_chips(str(bad))


def test_a_custom_file_overrides_the_shipped_numbers(tmp_path):
    data = copy.deepcopy(_shipped())
    data["chips"] = {"m2-max": data["chips"]["m2-max"]}
    data["chips"]["m2-max"]["ane_tflops"]["value"] = 9.5
    path = _write(tmp_path, data)
    assert chip_profile("M2 Max", path).ane_tflops == 9.5
    with pytest.raises(ValueError, match="known chips: m2-max$"):
        chip_profile("m1", path)


@pytest.mark.parametrize(
    "brand, name",
    [
        ("Apple M1", "m1"),
        ("Apple M1 Pro", "m1-pro"),
        ("Apple M2 Max", "m2-max"),
        ("Apple M3 Ultra", "m3-ultra"),
        ("Apple M4 Pro\n", "m4-pro"),
        ("Apple M5", "m5"),
        ("Intel(R) Core(TM) i9-9980HK CPU @ 2.40GHz", None),
        ("Apple processor", None),
    ],
)
def test_detect_chip_parses_the_brand_string(monkeypatch, brand, name):
    monkeypatch.setattr(chips.sys, "platform", "darwin")
    monkeypatch.setattr(chips.platform, "machine", lambda: "arm64")
    monkeypatch.setattr(chips, "_sysctl_brand", lambda: brand.strip())
    assert detect_chip() == name


def test_detect_chip_is_none_off_macos_arm64(monkeypatch):
    def boom():
        raise AssertionError("sysctl must not run off macOS arm64")

    monkeypatch.setattr(chips, "_sysctl_brand", boom)
    monkeypatch.setattr(chips.sys, "platform", "linux")
    monkeypatch.setattr(chips.platform, "machine", lambda: "x86_64")
    assert detect_chip() is None
    monkeypatch.setattr(chips.sys, "platform", "darwin")
    monkeypatch.setattr(chips.platform, "machine", lambda: "x86_64")  # Intel Mac
    assert detect_chip() is None


def test_detect_chip_is_none_when_sysctl_fails(monkeypatch):
    def fail():
        raise subprocess.CalledProcessError(1, ["sysctl"])

    monkeypatch.setattr(chips.sys, "platform", "darwin")
    monkeypatch.setattr(chips.platform, "machine", lambda: "arm64")
    monkeypatch.setattr(chips, "_sysctl_brand", fail)
    assert detect_chip() is None


def test_detect_chip_on_this_machine_does_not_raise():
    got = detect_chip()
    assert got is None or got in CHIP_NAMES


# --- physical sanity: catches a wrong or swapped entry -------------------------------------


def _p(name):
    return chip_profile(name)


@pytest.mark.parametrize("gen", GENERATIONS)
def test_gpu_bandwidth_and_throughput_grow_base_pro_max(gen):
    base, pro, mx = _p(gen), _p(gen + "-pro"), _p(gen + "-max")
    assert base.gpu_bw_gbs < pro.gpu_bw_gbs < mx.gpu_bw_gbs
    assert base.gpu_tflops < pro.gpu_tflops < mx.gpu_tflops
    assert base.gpu_power_w < mx.gpu_power_w


@pytest.mark.parametrize("gen", ("m1", "m2", "m3"))
def test_ultra_is_two_max_dies(gen):
    mx, ultra = _p(gen + "-max"), _p(gen + "-ultra")
    assert ultra.gpu_bw_gbs == pytest.approx(2 * mx.gpu_bw_gbs, rel=0.05)
    assert ultra.gpu_tflops == pytest.approx(2 * mx.gpu_tflops, rel=0.1)
    # Core ML places a program on one ANE: an Ultra's ANE is not faster than its Max's
    assert ultra.ane_bw_gbs == pytest.approx(mx.ane_bw_gbs, rel=0.1)


def test_ane_is_the_frugal_unit_and_the_gpu_the_wide_one():
    for name, p in load_chips().items():
        assert p.ane_power_w < p.gpu_power_w, name
        assert p.ane_bw_gbs <= p.gpu_bw_gbs, name  # the ANE reaches a part of DRAM bandwidth
        assert 0.5 < p.ane_tflops < 20, name  # below the ~19 TFLOPS fp16 peak, above noise
        assert 0.5 < p.gpu_tflops < 40, name
        assert p.ane_tflops * 1e12 / p.ane_power_w > p.gpu_tflops * 1e12 / p.gpu_power_w, name  # FLOP/J


def test_overheads_and_factor_are_in_physical_ranges():
    for name, p in load_chips().items():
        assert 1e-5 < p.ane_dispatch_s < 5e-3, name
        assert 1e-6 < p.gpu_dispatch_s < 1e-3, name
        assert 1e-6 < p.sync_s < 5e-3, name
        assert 1.0 <= p.both_bw_factor < 2.0, name  # shared DRAM: never the sum of both


def test_later_generations_have_at_least_as_much_ane_bandwidth():
    assert _p("m1").ane_bw_gbs < _p("m4").ane_bw_gbs < _p("m4-max").ane_bw_gbs
    assert _p("m3-max").ane_bw_gbs > 1.5 * _p("m3").ane_bw_gbs


def test_format_chips_is_a_markdown_table_with_every_value():
    rows = [_p("m1"), _p("m4-max")]
    text = format_chips(rows)
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[0].startswith("| chip |") and all(f in lines[0] for f in FIELDS)
    assert lines[1].startswith("|---|")
    assert lines[2].startswith("| m1 |") and lines[3].startswith("| m4-max |")
    assert lines[3].count("|") == len(FIELDS) + 2
    assert "546" in lines[3]  # M4 Max memory bandwidth
    assert "380u" in lines[2]  # sub-millisecond seconds shown in microseconds


def test_cli_prints_the_table_and_one_chip_with_sources(tmp_path, capsys):
    assert chips.main([]) == 0
    out = capsys.readouterr().out
    for name in CHIP_NAMES:
        assert f"| {name} |" in out
    assert chips.main(["--chip", "M3 Max"]) == 0
    out = capsys.readouterr().out
    assert "| m3-max |" in out and "| m3 |" not in out
    assert "- ane_bw_gbs = 120.22 GB/s: https://github.com/Anemll/anemll-bench" in out
    out_json = tmp_path / "one.json"
    assert chips.main(["--chip", "M3 Max", "--json", str(out_json)]) == 0
    assert capsys.readouterr().out == f"wrote {out_json} (1 chip profile)\n"  # the file, not the table too
    written = load_chips(str(out_json))
    assert list(written) == ["m3-max"]
    assert written["m3-max"] == chip_profile("m3-max")
    assert chips.main(["--json", str(tmp_path / "all.json")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'all.json'} ({len(CHIP_NAMES)} chip profiles)\n"
    assert load_chips(str(tmp_path / "all.json")) == load_chips()


def test_cli_unknown_chip_raises_one_line_error():
    with pytest.raises(ValueError, match="unknown chip 'M0'; known chips: m1, "):
        chips.main(["--chip", "M0"])


def test_shipped_file_is_what_the_build_script_produces():
    """chips.json is generated from benchmarks/build_chips.py (numbers + derivation rules)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "build_chips.py")
    spec = importlib.util.spec_from_file_location("build_chips", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.build() == _shipped()
