"""Program calls on several threads at once: same rows as one at a time, faults still caught."""

import numpy as np
import pytest

from ane_kernels.milrun import rel_err
from ane_kernels.spec import random_spec, reference_ffn
from npumoe_mlx.backends import Program, load_backend
from npumoe_mlx.runtime.dispatch import ProgramError, run_calls, workers

D = 64


def _setup(n_groups=5, G=2):
    be = load_backend("onnx")
    specs = [random_spec(G=G, D=D, H=32, tiers=(8, 16, 32), bits=4, seed=s) for s in range(n_groups)]
    progs = [be.load(s) for s in specs]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, D)).astype(np.float32)
    calls = []
    for gi in range(n_groups):  # two rounds of some groups: the same program twice in one layer call
        for cap in ((32, 8) if gi % 2 else (16,)):
            calls.append((gi, np.arange(G), cap, rng.integers(0, 40, G * cap)))
    return specs, progs, x, calls


def test_two_workers_write_the_rows_one_worker_does():
    specs, progs, x, calls = _setup()
    assert all(p.concurrent for p in progs)
    rows = sum(len(ids) * cap for _, ids, cap, _ in calls)
    outs1, outs2 = np.full((rows, D), np.nan, np.float32), np.full((rows, D), np.nan, np.float32)
    assert run_calls(progs, calls, x, outs1, n_workers=1) == rows
    for _ in range(3):
        assert run_calls(progs, calls, x, outs2, n_workers=2) == rows
        np.testing.assert_array_equal(outs1, outs2)
    off = 0
    for gi, ids, cap, src in calls:  # each call's rows, in call order, are its experts' FFN of its source rows
        ref = reference_ffn(specs[gi], x[src].reshape(len(ids), cap, D))
        assert rel_err(outs2[off : off + len(ids) * cap].reshape(ref.shape), ref) < 1e-5
        off += len(ids) * cap


class _Bad(Program):

    def __init__(self, G, y):
        self.G, self.y = G, y

    def run(self, x, tier):
        return self.y(x)


@pytest.mark.parametrize("bad, msg", [
    (lambda x: x * np.nan, "NaN or Inf"),
    (lambda x: x[:, :1], "returned shape"),
])
def test_a_bad_program_raises(bad, msg):
    specs, progs, x, calls = _setup()
    progs[3] = _Bad(2, bad)
    outs = np.empty((sum(len(ids) * cap for _, ids, cap, _ in calls), D), np.float32)
    with pytest.raises(ProgramError, match=msg):
        run_calls(progs, calls, x, outs, n_workers=2)


def test_nan_from_a_concurrent_program_raises():
    specs, progs, x, calls = _setup()
    x = x.copy()
    x[calls[2][3][0]] = np.inf  # a source row of group 1's first call
    outs = np.empty((sum(len(ids) * cap for _, ids, cap, _ in calls), D), np.float32)
    with pytest.raises(ProgramError, match="NaN or Inf"):
        run_calls(progs, calls, x, outs, n_workers=2)


def test_workers_follow_the_cost_model_unless_the_environment_says(monkeypatch):
    monkeypatch.delenv("NPUMOE_WORKERS", raising=False)
    assert workers(2) == 2 and workers(0) == 1 and workers() == 1
    monkeypatch.setenv("NPUMOE_WORKERS", "1")
    assert workers(2) == 1
