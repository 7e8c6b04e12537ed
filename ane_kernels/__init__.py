"""Static-shape expert FFN programs for MoE layers (Core ML / ANE and ONNX).

What a program computes lives in `spec` (ProgramSpec + numpy reference); `coreml` and
`onnx` build it, `formats` says how a Core ML program stores its weights, `limits` holds
the ANE constraints every build checks, `milrun` executes saved Core ML programs with numpy. Pure numpy + coremltools + onnx: this
package never imports the scheduler (npumoe_mlx). Builders import their toolkits lazily.
"""

import logging as _logging
import sys as _sys


def _drop_native_proxy_warnings(record) -> bool:
    """coremltools warns once per native class it cannot load (8 lines per process): off macOS
    they are expected (Core ML builds here, runs only on a Mac), so they are noise."""
    return not record.getMessage().startswith(("Failed to load _ML", "Failed to load '_ML"))


if _sys.platform != "darwin":  # on a Mac a missing native module is a real fault: keep it
    _logging.getLogger("coremltools").addFilter(_drop_native_proxy_warnings)  # before coremltools is imported

from .formats import DEFAULT_FORMAT, WEIGHT_FORMATS
from .limits import DEFAULT_LIMITS, LimitError, Limits, check_program, check_spec
from .spec import (
    ACTIVATIONS,
    AffineWeight,
    ProgramSpec,
    activate,
    dequantize,
    random_spec,
    reference_ffn,
    unpack_bits,
)

__all__ = [
    "ACTIVATIONS",
    "AffineWeight",
    "DEFAULT_FORMAT",
    "DEFAULT_LIMITS",
    "LimitError",
    "Limits",
    "ProgramSpec",
    "activate",
    "check_program",
    "check_spec",
    "dequantize",
    "random_spec",
    "reference_ffn",
    "unpack_bits",
    "WEIGHT_FORMATS",
]
