"""The onnx backend: the per-tier static graphs under onnxruntime.

One InferenceSession per (program, tier). On disk the tier graphs share one weight
file; in memory each session holds its own (prepacked) copy, as onnxruntime's Python
API offers no cross-session sharing of prepacked weights. Execution providers are configurable
(CPUExecutionProvider by default; "CoreMLExecutionProvider", "QNNExecutionProvider",
... are passed through as given). Inputs and outputs go through IO binding with a
preallocated output per tier, so a call copies nothing on the CPU provider: the
returned array is that buffer and is overwritten by the next run of the same tier.
"""

import glob
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from ane_kernels.onnx import INPUT_NAME, OUTPUT_NAME, build_onnx, graph_tier
from ane_kernels.spec import ProgramSpec

from . import BackendError, Program


class OnnxProgram(Program):
    """One program's tiers. Sessions open on a tier's first run (``lazy``): a bundle
    has many tiers, most calls use a few, and each session costs tens of ms to open.
    Copies and pickles drop the sessions; they reopen from the sources on first run."""

    transient = {"sessions": dict, "_bound": dict}

    def __init__(self, name: str, sources: Dict[int, "object"], G: int, D: int, open_session, lazy: bool = True):
        self.name, self.G, self.D = name, G, D
        self._sources = dict(sorted(sources.items()))
        self._open = open_session
        self.tiers = tuple(self._sources)
        self.sessions = {}
        self._bound = {}
        if not lazy:
            for t in self.tiers:
                self.session(t)

    def session(self, tier):
        s = self.sessions.get(tier)
        if s is None:
            s = self.sessions[tier] = self._open(self._sources[tier])
        return s

    def _binding(self, tier):
        b = self._bound.get(tier)
        if b is None:
            import onnxruntime as ort

            sess = self.session(tier)
            y = np.empty((self.G, tier, self.D), np.float32)
            io = sess.io_binding()
            io.bind_ortvalue_output(OUTPUT_NAME, ort.OrtValue.ortvalue_from_numpy(y))
            b = self._bound[tier] = (sess, io, y)
        return b

    def _run(self, x: np.ndarray, tier: int) -> np.ndarray:
        sess, io, y = self._binding(tier)
        io.bind_cpu_input(INPUT_NAME, x)
        sess.run_with_iobinding(io)
        return y


class Backend:
    name = "onnx"

    def __init__(
        self,
        providers: Optional[Sequence[Union[str, tuple]]] = None,
        threads: Optional[int] = None,
        provider_options: Optional[Sequence[dict]] = None,
        lazy: bool = True,
    ):
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.threads = threads
        self.provider_options = provider_options
        self.lazy = lazy

    def _session(self, model):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if self.threads:
            so.intra_op_num_threads = int(self.threads)
        so.inter_op_num_threads = 1
        # A bundle opens one session per (program, tier), each with its own pool:
        # spinning threads of idle sessions would starve the busy one (and MLX).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        kw = {} if self.provider_options is None else {"provider_options": self.provider_options}
        try:
            return ort.InferenceSession(model, sess_options=so, providers=self.providers, **kw)
        except Exception as e:
            raise BackendError(f"onnxruntime could not load a program: {e}") from e

    def load(self, src) -> OnnxProgram:
        """src: a ProgramSpec (built in memory), {tier: path}, a list of .onnx paths,
        one .onnx file, a path prefix `DIR/NAME` (loads DIR/NAME.c*.onnx), or a folder
        holding one program's tiers."""
        import onnx

        if isinstance(src, ProgramSpec):
            models = {t: (m, m.SerializeToString()) for t in src.tiers for m in [build_onnx(src, t)]}
            name = src.name
        else:
            paths = self._paths(src)
            models = {}
            for p in paths:
                m = onnx.load(str(p), load_external_data=False)  # weights: read by ORT
                t = graph_tier(m)
                if t in models:
                    raise BackendError(f"two graphs for tier {t} in {src}")
                models[t] = (m, str(p))
            name = Path(paths[0]).name.split(".c")[0]
        shapes = set()
        for t, (m, model) in models.items():
            x = next(i for i in m.graph.input if i.name == INPUT_NAME)
            dims = [d.dim_value for d in x.type.tensor_type.shape.dim]
            shapes.add((dims[0], dims[2]))
        if len(shapes) != 1:
            raise BackendError(f"graphs of different programs mixed in {src}: (G, D) {shapes}")
        G, D = shapes.pop()
        sources = {t: model for t, (_, model) in models.items()}
        return OnnxProgram(name, sources, G, D, self._session, lazy=self.lazy)

    @staticmethod
    def _paths(src) -> List[Path]:
        if isinstance(src, dict):
            return [Path(p) for p in src.values()]
        if isinstance(src, (list, tuple)):
            return [Path(p) for p in src]
        p = Path(src)
        if p.is_file():
            return [p]
        if p.is_dir():
            found = sorted(p.glob("*.onnx"))
        else:
            found = sorted(Path(f) for f in glob.glob(glob.escape(str(p)) + ".c*.onnx"))
        if not found:
            raise BackendError(f"no .onnx programs at {src}")
        return found
