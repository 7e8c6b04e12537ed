"""The onnx backend: a program's graphs under onnxruntime.

Providers that take dynamic shapes (the CPU provider; CUDA) run ONE session per
program: the tier graph with its row count made symbolic, so each expert's weights
are resident (and prepacked) once however many tiers the program has; the tiers stay
the unit of planning and padding. Providers that need static shapes (NPU providers,
Core ML, or ``shapes="static"``) get one session per (program, tier) from the static
tier graphs, each with its own copy. On disk the tier graphs share one weight file.
Inputs and outputs go through IO binding with a fresh numpy output per run, so a call
copies nothing on the CPU provider and holds no output memory between runs. All sessions of the process share one
CPU arena for their activations.

``build`` writes one graph per tier, ``<name>.c<tier>.onnx``, and their one weight
file ``<name>.weights``; its entry maps each tier to its graph. Each graph carries
the program's metadata (``ane_kernels.onnx.read_metadata``), which ``load`` checks
against the entry. A session opens from the graph and weight bytes read into memory
(``read_source``), each file checked against ``OnnxProgram.expect`` (the manifest's
sha256) on the very bytes the session copies: no file is mapped, so a file rewritten
or truncated under a running session changes nothing (it used to: SIGBUS, or other
weights).
"""

import glob
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ane_kernels.onnx import (INPUT_NAME, OUTPUT_NAME, build_onnx, dynamic_bytes, graph_info, op_counts, save_onnx,
                               weights_path)
from ane_kernels.spec import ProgramSpec

from . import BackendError, Program, member, same_program

SHAPES = ("auto", "dynamic", "static")
_SHARED_ARENA = []  # [True] once this process registered onnxruntime's shared CPU arena


def _shared_arena() -> bool:
    """Register one CPU arena for every session of this process (once). Each session's
    own arena keeps its largest activations for good; a bundle has tens of sessions,
    so a shared one holds the largest call's activations once (measured: 12 one-expert
    OLMoE-dims programs after tiers 8/32/128, +59 MB RSS shared vs +131 MB own arenas)."""
    import onnxruntime as ort

    if not _SHARED_ARENA:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, None)
            _SHARED_ARENA.append(True)
        except Exception:  # an older onnxruntime, or registered by someone else: own arenas
            _SHARED_ARENA.append(False)
    return _SHARED_ARENA[0]
# providers that run a graph with a symbolic dimension at full speed
DYNAMIC_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")


@dataclass(frozen=True)
class DynamicGraph:
    """Open ``path`` (a tier graph on disk) with its row count made symbolic; its
    external weight files ``weights`` (names in the graph's folder) are read with it."""

    path: str
    weights: Tuple[str, ...] = ()


@dataclass(frozen=True)
class GraphFile:
    """Open ``path`` (a tier graph on disk) as it is, with its external weight files."""

    path: str
    weights: Tuple[str, ...] = ()


@dataclass(frozen=True)
class InMemory:
    """A graph and its external weight files, read into memory this process owns.
    onnxruntime maps weight files it opens itself, so a file rewritten under a running
    session changed its output and a truncated one killed the process (SIGBUS); from
    memory, the session copies the weights once and the files no longer matter."""

    model: bytes
    files: Dict[str, bytes]  # the name the graph's external data names -> the file's bytes


def read_source(src, expect: Optional[Dict[str, str]] = None):
    """``src`` (a DynamicGraph or GraphFile) read into an InMemory, each file checked against
    ``expect`` ({absolute path: sha256}) on the very bytes the session will use; other
    sources as they are. BackendError names a file whose bytes differ."""
    if not isinstance(src, (DynamicGraph, GraphFile)):
        return src
    graph = Path(src.path)

    def read(p: Path) -> bytes:
        try:
            data = p.read_bytes()
        except OSError as e:
            raise BackendError(f"program file {p} cannot be read ({e.strerror or e})") from None
        want = (expect or {}).get(str(p.absolute()))
        if want is not None and hashlib.sha256(data).hexdigest() != want:
            raise BackendError(f"program file {p} is damaged or changed since the build "
                               f"(its sha256 is not the manifest's)")
        return data

    model = read(graph)
    files = {w: read(graph.parent / w) for w in src.weights}
    return InMemory(dynamic_bytes(model) if isinstance(src, DynamicGraph) else model, files)


# Programs per process: no limit is known for onnxruntime sessions (memory is the bound:
# residency.py); the planner's 4096 keeps plans finite. One session per program on dynamic
# providers (every tier), so a program counts once (static providers: one per tier, not counted).
PROGRAM_BUDGET = 4096
PROGRAM_BUDGET_SOURCE = "no per-process limit known for onnxruntime sessions (the planner's cap)"
TIERS_ARE_PROGRAMS = False

# Host bytes (read + written) per element of a program row on this program's path, counted
# by tests/test_copies.py: dispatch.gather 8 (fp32 rows into (G, C, D)), onnxruntime reads
# them and writes its output in place (IO binding: no copy), dispatch.checked reads it (4).
# The executor's finish comes on top (``registry.host_bytes``, ``dispatch.finish_bytes``): MLX
# on a GPU, the slot buffer's one copy to MLX (8 per row element: 20 in all, as before);
# MLX on the CPU, numpy's take into pair order and its copy to MLX (16 per pair element).
HOST_BYTES_PER_ELEMENT = 12


class OnnxProgram(Program):
    """One program's tiers. Sessions open on first run (``lazy``): a bundle has many
    programs, most calls use a few, and a session costs tens of ms to open. ``sources``
    maps each tier to what its session opens from (a path, model bytes, or a
    DynamicGraph); tiers that share a source share one session. Copies and pickles drop
    the sessions; they reopen from the sources on first run."""

    transient = {"sessions": dict, "_lock": threading.Lock}
    concurrent = True  # run_into may be called from several threads at once (onnxruntime releases the GIL)

    def __init__(self, name: str, sources: Dict[int, "object"], G: int, D: int, open_session, lazy: bool = True,
                 meta: Optional[dict] = None):
        self.name, self.G, self.D = name, G, D
        self.meta = dict(meta or {})
        self._sources = dict(sorted(sources.items()))
        self._open = open_session
        self.tiers = tuple(self._sources)
        self.sessions = {}
        self._lock = threading.Lock()  # opens a session once when threads ask at the same time
        self.expect: Dict[str, str] = {}  # {absolute path: sha256} each file read is checked against (read_source)
        if not lazy:
            for t in self.tiers:
                self.session(t)

    @property
    def dynamic(self) -> bool:
        """One session serves every tier (a symbolic row count)."""
        return len({id(s) for s in self._sources.values()}) == 1

    def add_tiers(self, tiers: Sequence[int]) -> None:
        """Serve more row counts from the one dynamic session (no new weights; an output
        buffer per tier on first use). Static programs keep their tiers."""
        if not self.dynamic or not self._sources:
            return
        src = next(iter(self._sources.values()))
        self._sources = dict(sorted({**{int(t): src for t in tiers if int(t) > 0}, **self._sources}.items()))
        self.tiers = tuple(self._sources)

    def expect_files(self, sha256: Dict[str, str]) -> bool:
        self.expect.update(sha256)  # read_source checks each file's bytes as a session copies them
        return True

    def open(self) -> None:
        self.session(min(self.tiers))

    def session(self, tier):
        s = self.sessions.get(tier)
        if s is None:
            with self._lock:
                s = self.sessions.get(tier)
                if s is None:
                    src = self._sources[tier]
                    s = next((self.sessions[t] for t in self.sessions if self._sources[t] is src), None)
                    if s is None:
                        s = self._open(read_source(src, self.expect))
                    self.sessions[tier] = s
        return s

    def run_into(self, x: np.ndarray, tier: int, out: np.ndarray) -> np.ndarray:
        """Run x (G, tier, D) float32 C-contiguous, writing y into ``out`` (G, tier, D), a
        C-contiguous float32 array (a view of the caller's buffer: no output copy). A fresh
        IO binding per call, so calls from several threads at once are safe."""
        import onnxruntime as ort

        if x.shape != (self.G, tier, self.D) or out.shape != x.shape:
            raise ValueError(f"x {x.shape} / out {out.shape}, program {self.name} wants ({self.G}, {tier}, {self.D})")
        if tier not in self.tiers:
            raise ValueError(f"tier {tier} not in program {self.name} tiers {self.tiers}")
        sess = self.session(tier)
        io = sess.io_binding()
        io.bind_cpu_input(INPUT_NAME, np.ascontiguousarray(x, dtype=np.float32))
        io.bind_ortvalue_output(OUTPUT_NAME, ort.OrtValue.ortvalue_from_numpy(out))
        sess.run_with_iobinding(io)
        return out

    def _run(self, x: np.ndarray, tier: int) -> np.ndarray:
        # A fresh output per run (freed once the caller is done with it): a buffer kept per
        # tier held every tier's largest output for good, ~0.4 GB at OLMoE dims, 2 layers.
        # A fresh IO binding too (~10 us): a binding kept per tier kept its last input alive
        # (onnxruntime 1.32, after clear_binding_inputs too): one input per tier per program,
        # ~1.2 MB per program after the demo's warm-up, GBs at qwen3 dims.
        return self.run_into(x, tier, np.empty((self.G, tier, self.D), np.float32))


class Backend:
    name = "onnx"

    def __init__(
        self,
        providers: Optional[Sequence[Union[str, tuple]]] = None,
        threads: Optional[int] = None,
        provider_options: Optional[Sequence[dict]] = None,
        lazy: bool = True,
        shapes: str = "auto",
    ):
        if shapes not in SHAPES:
            raise ValueError(f"shapes must be one of {', '.join(SHAPES)}, got {shapes!r}")
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.threads = threads
        self.provider_options = provider_options
        self.lazy = lazy
        self.shapes = shapes

    @property
    def dynamic(self) -> bool:
        """Whether programs load as one session with a symbolic row count."""
        if self.shapes != "auto":
            return self.shapes == "dynamic"
        names = [p[0] if isinstance(p, tuple) else p for p in self.providers]
        return all(n in DYNAMIC_PROVIDERS for n in names)

    def _session(self, model):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if self.threads:
            so.intra_op_num_threads = int(self.threads)
        so.inter_op_num_threads = 1
        # A bundle opens a session per program, each with its own pool:
        # spinning threads of idle sessions would starve the busy one (and MLX).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if _shared_arena():
            so.add_session_config_entry("session.use_env_allocators", "1")
        model = read_source(model)
        if isinstance(model, InMemory):  # (the session copies the weights; the buffers can go after)
            names = list(model.files)
            bufs = [np.frombuffer(model.files[n], np.uint8) for n in names]
            so.add_external_initializers_from_files_in_memory(names, bufs, [b.size for b in bufs])
            model = model.model
        kw = {} if self.provider_options is None else {"provider_options": self.provider_options}
        try:
            return ort.InferenceSession(model, sess_options=so, providers=self.providers, **kw)
        except Exception as e:
            raise BackendError(f"onnxruntime could not load a program: {e}") from e

    @staticmethod
    def build(spec: ProgramSpec, out_dir, *, limits=None, layout=None, log=None) -> dict:
        """Write `spec`'s tier graphs and their weight file into `out_dir`; returns the entry.
        limits, layout: the Neural Engine's (Core ML); graphs for onnxruntime have neither."""
        paths = save_onnx(spec, out_dir)
        w = weights_path(out_dir, spec.name)
        files = [p.name for p in paths.values()] + ([w.name] if w.exists() else [])
        if log is not None:
            import onnx

            if w.exists():
                log(f"wrote {w} ({w.stat().st_size / 1e6:.2f} MB weights shared by {len(paths)} graphs)")
            for p in paths.values():
                nodes = sum(op_counts(onnx.load(str(p), load_external_data=False)).values())
                log(f"wrote {p} ({p.stat().st_size / 1e6:.2f} MB, {nodes} nodes)")
        return {**spec.describe(), "graphs": {str(t): p.name for t, p in paths.items()}, "files": files}

    @classmethod
    def checker(cls, entry: dict, folder) -> Tuple[OnnxProgram, List[int]]:
        """A fresh build under onnxruntime's CPU provider, and every tier to check."""
        prog = cls().load(entry, folder)
        return prog, list(prog.tiers)

    def load(self, src, folder=None) -> OnnxProgram:
        """src: an entry ``build`` returned, with the `folder` it wrote to; a ProgramSpec
        (graphs built in memory); or loose graphs: {tier: path}, a list of .onnx paths,
        one .onnx file, a path prefix `DIR/NAME` (loads DIR/NAME.c*.onnx), or a folder
        holding one program's tiers."""
        dynamic = self.dynamic
        if isinstance(src, ProgramSpec):
            if dynamic:
                shared = build_onnx(src, None).SerializeToString()
                sources = {t: shared for t in src.tiers}
            else:
                sources = {t: build_onnx(src, t).SerializeToString() for t in src.tiers}
            return OnnxProgram(src.name, sources, src.G, src.D, self._session, lazy=self.lazy, meta=src.describe())
        if folder is not None:
            meta = src
            paths = {int(t): member(folder, f) for t, f in src["graphs"].items()}
            self._check_graphs(paths, meta)
            weights = tuple(member(folder, f).name for f in src.get("files", ()) if f.endswith(".weights"))
        else:
            paths, meta = self._loose(src)
            w = weights_path(paths[min(paths)].parent, meta["name"])
            weights = (w.name,) if w.is_file() else ()
        if dynamic:
            shared = DynamicGraph(str(paths[min(paths)]), weights)
            sources = {t: shared for t in paths}
        else:
            sources = {t: GraphFile(str(p), weights) for t, p in paths.items()}
        return OnnxProgram(meta["name"], sources, int(meta["G"]), int(meta["D"]), self._session,
                           lazy=self.lazy, meta=meta)

    @staticmethod
    def _graph_info(p: Path) -> Tuple[dict, int]:
        """(metadata, tier) of a graph file, read without the ``onnx`` package (weights aside:
        ORT reads those): a process that runs programs never imports it."""
        try:
            return graph_info(p.read_bytes())
        except ValueError as e:
            raise BackendError(f"{p.name}: {e}") from None

    @classmethod
    def _check_graphs(cls, paths: Dict[int, Path], meta: dict) -> None:
        """Each graph parses and is its tier of the entry's program."""
        for t, p in paths.items():
            found, tier = cls._graph_info(p)
            same_program(meta, found, p.name)
            if tier != t:
                raise BackendError(f"{p.name} is the tier {tier} graph, the entry says tier {t}")

    def _loose(self, src) -> Tuple[Dict[int, Path], dict]:
        """{tier: path} and the program's metadata of loose graph files (read from the graphs)."""
        paths, metas = {}, []
        for p in self._paths(src):
            found, t = self._graph_info(p)
            if t in paths:
                raise BackendError(f"two graphs for tier {t} in {src}")
            paths[t] = p
            metas.append(found)
        names = {m["name"] for m in metas}
        if len(names) != 1:
            raise BackendError(f"graphs of different programs mixed in {src}: {', '.join(sorted(names))}")
        return dict(sorted(paths.items())), metas[0]

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
