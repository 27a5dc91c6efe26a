"""Runtime rewrites of a built model, kept out of the model files (STYLE.md rule 9).

Each module here takes a Flux built by flux_core and rewrites its modules from outside, the way
gpt-fast's quantize.py does: the model files (model.py, blocks.py, layers.py) never know, and no
module name or checkpoint key changes.

    fp8       weight-only float8 (e4m3fn) storage of the blocks' Linear layers, and the fp8 file layouts
    compile   regional torch.compile: each block class compiled once
"""

from .compile import CompileUnsupported, check_compile_support, compile_blocks
from .fp8 import WEIGHTS_FORMATS, Fp8Layout, Fp8Linear, check_weights_format, fp8_layout, quantize_linears

__all__ = [
    "WEIGHTS_FORMATS",
    "CompileUnsupported",
    "Fp8Layout",
    "Fp8Linear",
    "check_compile_support",
    "check_weights_format",
    "compile_blocks",
    "fp8_layout",
    "quantize_linears",
]
