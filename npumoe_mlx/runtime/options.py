"""``OffloadOptions``: what a user chooses about the offload, as one value.

Built once (``from_kwargs`` for ``load(..., offload="onnx", ...)``, ``from_args`` for the
command line) and passed whole to every entry point: ``load``/``install``, ``offload.apply``,
``installer.install``, ``sharded_load``/``sharded.install``, ``npumoe generate``/``chat``/
``server``. A new option is one field here (with its flag, if the command line has one) and
the code that reads it: no signature in between changes.
"""

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional

from ..backends import registry
from ..planning.tiers import OVERFLOW_MODES

DENSE_HELP = ("Also run the non-expert linears (attention projections, dense MLPs) on onnxruntime where this "
              "machine measures them faster than MLX (onnx backend only; costs saved in the bundle's "
              "dense-costs.json).")

MODES = ("auto", *registry.names(), "off")


class OffloadError(ValueError):
    pass


def _flag(**argparse_kw) -> dict:
    """Field metadata: the option's command-line flag (``add_args``), argparse's keywords."""
    return {"flag": argparse_kw}


@dataclass(frozen=True)
class OffloadOptions:
    """Every offload option ``load`` takes besides mlx_lm's own arguments (see ``load``'s docstring)."""

    offload: str = field(default="auto", metadata=_flag(
        choices=MODES,
        help="Where expert FFNs run: auto (Core ML on Apple Silicon, ONNX Runtime elsewhere, when built), "
        "coreml, onnx, mlx (static-tier reference on MLX), off (stock mlx_lm). Default: auto."))
    bundle: Optional[str] = field(default=None, metadata=_flag(
        help="Offload bundle folder (default: <model>/npumoe-<backend> if one is there, else the "
        "cache's, $NPUMOE_CACHE/bundles/<fingerprint>-<backend>)."))
    verify: bool = field(default=False, metadata=_flag(
        action="store_true",
        help="At load, check every program tier against the model's experts and every bundle file's "
        "whole sha256 (default: a sample of programs, and sampled hashes)."))
    overflow: str = field(default="auto", metadata=_flag(
        choices=OVERFLOW_MODES,
        help="Pairs past a group's top tier: auto (cost model picks), rerun the ladder, spill to "
        "MLX, or drop them (the paper's behaviour, for comparison; never the default)."))
    keep_mlx_experts: bool = field(default=False, metadata=_flag(
        action="store_true",
        help="Keep MLX's copy of the experts only programs serve (default: an onnx bundle releases it "
        "and it is read back from the model's safetensors if MLX needs it)."))
    # True/False, or a dense.DenseCosts to decide with (not imported: dense.py imports offload, which imports this)
    dense_programs: Any = field(default=False, metadata=_flag(action="store_true", help=DENSE_HELP))
    backend_options: Optional[Dict[str, Any]] = None  # e.g. {"providers": [...], "threads": 2} for onnx
    quiet: bool = False  # no [npumoe] notices

    def __post_init__(self):
        if self.offload not in MODES:
            raise OffloadError(f"unknown offload mode {self.offload!r}; choose one of {', '.join(MODES)}")
        if self.overflow not in OVERFLOW_MODES:
            raise ValueError(f"unknown overflow {self.overflow!r}; choose one of {', '.join(OVERFLOW_MODES)}")
        for name in ("verify", "keep_mlx_experts", "quiet"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"offload option {name} must be True or False, got {getattr(self, name)!r}")
        if not (isinstance(self.dense_programs, bool) or dataclasses.is_dataclass(self.dense_programs)):  # (DenseCosts)
            raise ValueError(f"offload option dense_programs must be True, False or a dense.DenseCosts, "
                             f"got {self.dense_programs!r}")
        if self.bundle is not None and not isinstance(self.bundle, (str, os.PathLike)):
            raise ValueError(f"offload option bundle must be a folder path, got {self.bundle!r}")
        if self.backend_options is not None and not isinstance(self.backend_options, dict):
            raise ValueError(f"offload option backend_options must be a dict, got {self.backend_options!r}")

    @classmethod
    def from_kwargs(cls, **kw) -> "OffloadOptions":
        """From keyword arguments (``load(..., offload="onnx", verify=True)``); an unknown one is a ValueError."""
        return cls().replace(**kw)

    @classmethod
    def from_args(cls, ns) -> "OffloadOptions":
        """From a namespace parsed by a parser ``add_args`` extended: every option that has a flag."""
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if "flag" in f.metadata})

    def replace(self, **kw) -> "OffloadOptions":
        """These options with ``kw`` over them, each checked; an unknown name is a ValueError naming it."""
        names = [f.name for f in fields(self)]
        unknown = sorted(set(kw) - set(names))
        if unknown:
            raise ValueError(f"unknown offload option {unknown[0]!r}; the options are {', '.join(names)}")
        return dataclasses.replace(self, **kw)

    @classmethod
    def merged(cls, options: Optional["OffloadOptions"], **kw) -> "OffloadOptions":
        """``options`` (default: the defaults) with keyword arguments over it: the public entry points'
        ``options=`` and ``**kw``."""
        if options is not None and not isinstance(options, cls):
            raise ValueError(f"options must be an OffloadOptions, got {type(options).__name__}")
        return (options or cls()).replace(**kw)


def add_args(parser):
    """The offload flags (``--offload``, ``--bundle``, ...): one per option that has a flag."""
    for f in fields(OffloadOptions):
        if "flag" in f.metadata:
            parser.add_argument("--" + f.name.replace("_", "-"), default=f.default, **f.metadata["flag"])
    return parser
