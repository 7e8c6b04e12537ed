"""A load with a bundle walks the model's modules once (issue 9 item 5): blocks carry their
MoE layer (router) and shared experts, so the installer never walks the model again."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlx.nn as nn
import mlx_lm.utils as mlx_utils
import pytest

import npumoe_mlx
from npumoe_mlx.runtime.executor import OffloadExecutor, SharedExecutor


WALKS = ("named_modules", "modules", "leaf_modules")  # each traverses the whole tree below its module


def _count_walks(monkeypatch):
    """Count whole-model walks: calls of WALKS on the model mlx_lm just loaded."""
    seen = {"model": None, "walks": []}
    load_model = mlx_utils.load_model

    def loading(*a, **k):
        out = load_model(*a, **k)
        seen["model"] = out[0]
        return out

    monkeypatch.setattr(mlx_utils, "load_model", loading)
    for name in WALKS:
        def walk(self, *a, _orig=getattr(nn.Module, name), _name=name, **k):
            if self is seen["model"]:
                seen["walks"].append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(nn.Module, name, walk)
    return seen


@pytest.mark.parametrize("overflow", ["auto", "drop"])
def test_load_with_a_bundle_walks_the_model_once(eager_qwen2, monkeypatch, overflow):
    seen = _count_walks(monkeypatch)
    model, _ = npumoe_mlx.load(str(eager_qwen2), offload="onnx", overflow=overflow, quiet=True)
    assert seen["walks"] == ["named_modules"]  # was 7 (3 block searches + the shared experts' lookup), +1 per layer with drop
    monkeypatch.undo()
    ex = [m.executor for _, m in model.named_modules() if hasattr(m, "executor")]
    assert sum(isinstance(e, OffloadExecutor) for e in ex) == 2 and sum(isinstance(e, SharedExecutor) for e in ex) == 2
    routed = [e for e in ex if isinstance(e, OffloadExecutor)]
    assert all((e.router is not None) == (overflow == "drop") for e in routed)  # drop found each layer's router
