"""Runtime rewrites of a built model, kept out of the model files (STYLE.md rule 9).

Each module here takes a Flux built by flux_core and rewrites its modules from outside, the way
gpt-fast's quantize.py does: the model files (model.py, blocks.py, layers.py) never know.

    fp8   weight-only float8 (e4m3fn) storage of the blocks' Linear layers, and the fp8 file layouts
"""

from .fp8 import WEIGHTS_FORMATS, Fp8Layout, Fp8Linear, check_weights_format, fp8_layout, quantize_linears

__all__ = ["WEIGHTS_FORMATS", "Fp8Layout", "Fp8Linear", "check_weights_format", "fp8_layout", "quantize_linears"]
