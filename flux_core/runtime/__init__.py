"""Performance tooling that works on a built model from outside (STYLE rule 9): nothing here is
imported by the model files, and nothing here changes module names or checkpoint keys."""

from .compile import CompileUnsupported, check_compile_support, compile_blocks

__all__ = ["CompileUnsupported", "check_compile_support", "compile_blocks"]
