"""Options and the bundle's JSON as types (issue 20 item 4): ``OffloadOptions`` built once and
passed whole (load, install, sharded_load, the command lines), the typed ``Manifest``, and
``Plan.from_dict`` checking what it reads, each bad field a one-line error naming it."""

import importlib
import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from mlx_lm import load as stock_load
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_sampler

import npumoe_mlx
from npumoe_mlx.build.build import build as build_bundle
from npumoe_mlx.bundle import bundle as bundles
from npumoe_mlx.planning.schema import SchemaError
from npumoe_mlx.planning.cost import CostModel
from npumoe_mlx.planning.plan import GroupPlan, LayerPlan, Plan, PlanLimits, SharedPlan
from npumoe_mlx.runtime import release
from npumoe_mlx.runtime.executor import offload_stats, summarize
from npumoe_mlx.runtime.options import OffloadError, OffloadOptions
from npumoe_mlx.tools.tiny import make_tiny_model

generate = importlib.import_module("npumoe_mlx.cli.generate")  # (npumoe_mlx.generate the attribute is mlx_lm's)
EAGER = CostModel("onnx", 1e-9, 1e15, 1e15, 0.0, 1.0, 1.0, first_offload_tokens=1, source="test: offload everything")
PROMPT = "The quick brown fox jumps over the lazy dog. " * 3


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """A float32 tiny qwen2_moe (routed + shared experts) with its onnx bundle beside it."""
    path = make_tiny_model(tmp_path_factory.mktemp("options") / "m", "qwen2_moe", seed=2)
    build_bundle(str(path), "onnx", corpus=["qa"], tokens=256, chunk_size=128, cost=EAGER, log=lambda m: None)
    return path


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A tiny qwen3_moe (a family mlx_lm can shard) with its onnx bundle."""
    path = make_tiny_model(tmp_path_factory.mktemp("options") / "q", "qwen3_moe", seed=3)
    build_bundle(str(path), "onnx", corpus=["qa"], tokens=256, chunk_size=128, cost=EAGER, log=lambda m: None)
    return path


def _greedy(model, tok, n=8):
    return [r.token for r in stream_generate(model, tok, PROMPT, max_tokens=n, sampler=make_sampler(0.0))]


# --- OffloadOptions ------------------------------------------------------------------------

BAD_OPTIONS = {  # id: (keyword arguments, error type, the one line it says)
    "unknown": ({"dummy_flag": True}, ValueError, "unknown offload option 'dummy_flag'; the options are offload, bundle"),
    "mode": ({"offload": "gpu"}, OffloadError, "unknown offload mode 'gpu'; choose one of auto, "),
    "overflow": ({"overflow": "sometimes"}, ValueError, "unknown overflow 'sometimes'; choose one of auto, rerun, spill, drop"),
    "verify-string": ({"verify": "yes"}, ValueError, "offload option verify must be True or False, got 'yes'"),
    "keep-int": ({"keep_mlx_experts": 1}, ValueError, "offload option keep_mlx_experts must be True or False, got 1"),
    "bundle-int": ({"bundle": 3}, ValueError, "offload option bundle must be a folder path, got 3"),
    "backend-options-list": ({"backend_options": ["threads", 2]}, ValueError,
                             "offload option backend_options must be a dict, got ['threads', 2]"),
    "dense-none": ({"dense_programs": None}, ValueError, "offload option dense_programs must be True, False or a dense.DenseCosts"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_a_bad_option_is_one_line_naming_it(case):
    kw, err, msg = BAD_OPTIONS[case]
    with pytest.raises(err) as e:
        OffloadOptions.from_kwargs(**kw)
    assert str(e.value).startswith(msg) and "\n" not in str(e.value), str(e.value)


def test_options_from_kwargs_from_args_and_merged():
    opts = OffloadOptions.from_kwargs(offload="onnx", verify=True, backend_options={"threads": 1})
    assert (opts.offload, opts.verify, opts.backend_options, opts.overflow) == ("onnx", True, {"threads": 1}, "auto")
    ns = generate.setup_arg_parser().parse_args(
        ["--offload", "mlx", "--bundle", "B", "--verify", "--overflow", "spill", "--keep-mlx-experts", "--dense-programs"])
    assert OffloadOptions.from_args(ns) == OffloadOptions(
        offload="mlx", bundle="B", verify=True, overflow="spill", keep_mlx_experts=True, dense_programs=True)
    assert OffloadOptions.from_args(generate.setup_arg_parser().parse_args([])) == OffloadOptions()
    assert OffloadOptions.merged(opts, quiet=True) == OffloadOptions(
        offload="onnx", verify=True, backend_options={"threads": 1}, quiet=True)
    with pytest.raises(ValueError, match="options must be an OffloadOptions, got dict"):
        OffloadOptions.merged({"offload": "onnx"})


def test_every_flagged_option_is_a_flag_of_generate_chat_and_server():
    """One field with a flag is a flag of every front door (and read back whole by from_args)."""
    from npumoe_mlx.cli import chat, server

    flagged = [f for f, v in OffloadOptions.__dataclass_fields__.items() if "flag" in v.metadata]
    assert set(flagged) >= {"offload", "bundle", "verify", "overflow", "keep_mlx_experts", "dense_programs"}
    for parser in (generate.setup_arg_parser(), chat.setup_arg_parser(), server.setup_arg_parser()):
        opts = {a.dest for a in parser._actions}
        assert set(flagged) <= opts, parser.prog


def test_load_takes_options_whole_or_as_keywords(moe):
    assert npumoe_mlx.OffloadOptions is OffloadOptions and "OffloadOptions" in npumoe_mlx.__all__  # the README's name
    by_kw, tok = npumoe_mlx.load(str(moe), offload="onnx", quiet=True, keep_mlx_experts=True)
    by_opts, _ = npumoe_mlx.load(str(moe), options=OffloadOptions(offload="onnx", quiet=True, keep_mlx_experts=True))
    over, _ = npumoe_mlx.load(str(moe), options=OffloadOptions(offload="off"), offload="onnx", quiet=True)  # keywords win
    want = _greedy(stock_load(str(moe))[0], tok)
    for model in (by_kw, by_opts, over):
        assert _greedy(model, tok) == want
        assert summarize(offload_stats(model))["program_calls"] > 0
    with pytest.raises(ValueError, match="unknown offload option 'verfy'"):
        npumoe_mlx.load(str(moe), offload="onnx", verfy=True)
    model, _ = stock_load(str(moe))
    assert npumoe_mlx.install(model, options=OffloadOptions(offload="onnx", quiet=True), model_path=str(moe)) == "onnx"
    assert npumoe_mlx.install(model, "off", options=OffloadOptions(offload="onnx")) == "off"  # positional mode wins


def test_sharded_load_takes_every_option_one_process(qwen3):
    """The drift the issue names: sharded_load took neither keep_mlx_experts nor dense_programs."""
    plain, tok = npumoe_mlx.sharded_load(str(qwen3), offload="onnx", quiet=True)
    assert release.released_bytes(plain) > 0  # an onnx bundle releases MLX's copy of program-only experts
    kept, _ = npumoe_mlx.sharded_load(str(qwen3), options=OffloadOptions(offload="onnx", quiet=True,
                                                                         keep_mlx_experts=True))
    assert release.released_bytes(kept) == 0 and summarize(offload_stats(kept))["program_calls"] == 0
    assert _greedy(kept, tok) == _greedy(plain, tok)
    assert summarize(offload_stats(kept))["program_calls"] > 0
    # mlx_lm's sharded_load shards the linears even in one process: refused in one line, not ignored
    with pytest.raises(OffloadError, match=r"^dense programs are not supported on sharded models yet \(their linears"):
        npumoe_mlx.sharded_load(str(qwen3), offload="onnx", dense_programs=True, quiet=True)


# --- Manifest ------------------------------------------------------------------------------


def test_manifest_round_trips_the_json_a_build_writes(moe):
    d = json.loads((moe / "npumoe-onnx" / "manifest.json").read_text())
    man = bundles.Manifest.from_dict(d)
    assert man.to_dict() == d  # the same keys and values: bundles on disk read unchanged
    assert set(d) == {"kind", "format", "npumoe_version", "backend", "model_fingerprint", "model_type", "created",
                      "meta", "programs"}
    assert set(d["programs"][0]) == {"layer", "group", "dir", "program", "files"}
    assert man.total_bytes() == sum(f["bytes"] for p in d["programs"] for f in p["files"].values()) > 0
    b = bundles.read(moe / "npumoe-onnx", moe, str(moe))
    assert isinstance(b.manifest, bundles.Manifest) and b.manifest == man
    want = {(lp.layer, gi) for lp in b.plan.layers for gi in range(len(lp.groups))}
    want |= {(lp.layer, f"s{si}") for lp in b.plan.layers for si in range(len(lp.shared))}
    assert {p.key for p in man.programs} == want and len(man.programs) == len(want)


def _delete(path):
    def fn(obj):
        *head, last = path
        for k in head:
            obj = obj[k]
        del obj[last]
    return fn


def _put(path, value):
    def fn(obj):
        *head, last = path
        for k in head:
            obj = obj[k]
        obj[last] = value
    return fn


MANIFEST_CASES = {  # id: (edit, the field and what is wrong)
    "dir-missing": (_delete(["programs", 0, "dir"]), "programs[0].dir is missing"),
    "files-missing": (_delete(["programs", 1, "files"]), "programs[1].files is missing"),
    "version-number": (_put(["npumoe_version"], 3), "npumoe_version is 3 (an integer), but it must be a string"),
    "group-float": (_put(["programs", 0, "group"], 0.5), 'programs[0].group is 0.5 (a number), but it must be a group index'),
    "meta-list": (_put(["meta"], []), "meta is [] (a list), but it must be an object"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_manifest_field_wrong_or_missing_names_field_and_bundle(moe, tmp_path, case):
    fn, msg = MANIFEST_CASES[case]
    d = tmp_path / "b"
    shutil.copytree(moe / "npumoe-onnx", d)
    man = json.loads((d / "manifest.json").read_text())
    fn(man)
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(bundles.BundleError) as e:
        bundles.read(d, moe, str(moe))
    line = str(e.value)
    assert line.startswith(f"{d / 'manifest.json'}: {msg}") and "\n" not in line, line


# --- Plan.from_dict ------------------------------------------------------------------------


def _plan_dict() -> dict:
    lp = LayerPlan(0, "model.layers.0.mlp", 8, 2, 16, 32, [GroupPlan([0, 1], [8, 16]), GroupPlan([2], [8])], [3, 4],
                   min_tokens=4, shared=[SharedPlan("model.layers.0.mlp.shared_expert", 32, [8, 16])])
    return Plan("onnx", PlanLimits.for_backend("onnx"), [lp]).to_dict()


PLAN_CASES = {  # id: (edit, the one line from_dict raises)
    "layer-missing-D": (_delete(["layers", 0, "D"]), "layers[0].D is missing"),
    "backend-missing": (_delete(["backend"]), "backend is missing"),
    "limits-missing": (_delete(["limits"]), "limits is missing"),
    "tier-string": (_put(["layers", 0, "groups", 0, "tiers", 1], "16"),
                    'layers[0].groups[0].tiers[1] is "16" (a string), but it must be an integer'),
    "tiers-descending": (_put(["layers", 0, "groups", 0, "tiers"], [16, 8]),
                         "layers[0].groups[0].tiers is [16, 8] (a list), but it must be ascending, each tier once"),
    "negative-H": (_put(["layers", 0, "shared", 0, "H"], -1), "layers[0].shared[0].H is -1 (an integer), but it must be >= 1"),
    "extra-field": (_put(["layers", 0, "speed"], 1), "layers[0].speed is not a field of LayerPlan"),
    "limits-backend": (_put(["limits", "backend"], "coreml"), 'limits.backend is "coreml" (a string), but it must be the plan\'s backend, "onnx"'),
    "backend-unknown": (lambda d: (d.update(backend="gpu"), d["limits"].update(backend="gpu")),
                        'backend is "gpu", but it must be one of '),
    "format": (_put(["format"], 7), "plan format 7 is not 1"),
    "not-an-object": (None, "its top level is [] (a list), but it must be an object"),
}


@pytest.mark.parametrize("case", sorted(PLAN_CASES))
def test_plan_from_dict_names_the_bad_field(case):
    fn, msg = PLAN_CASES[case]
    d = _plan_dict()
    if fn is None:
        d = []
    else:
        fn(d)
    with pytest.raises(SchemaError) as e:
        Plan.from_dict(d)
    assert str(e.value).startswith(msg) and "\n" not in str(e.value), str(e.value)


def test_plan_round_trips():
    d = _plan_dict()
    assert Plan.from_dict(d).to_dict() == d
