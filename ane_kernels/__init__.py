"""Static-shape expert FFN programs for MoE layers (Core ML / ANE and ONNX).

What a program computes lives in `spec` (ProgramSpec + numpy reference); `coreml` and
`onnx` build it, `formats` says how a Core ML program stores its weights, `limits` holds
the ANE constraints every build checks, `milrun` executes saved Core ML programs with numpy. Pure numpy + coremltools + onnx: this
package never imports the scheduler (npumoe_mlx). Builders import their toolkits lazily.
"""

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
