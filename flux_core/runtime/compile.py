"""Regional compilation: each repeated transformer block is compiled once, from outside the model.

    compile_blocks(model)           # every DoubleStreamBlock and SingleStreamBlock, in place
    out = model(...)                # first call compiles (seconds), the next ones reuse the code

The same holds for FLUX.2 (flux_core/flux2: 8 + 48 blocks for dev, 5 + 20 for klein 4B), whose
shared modulation layers run once per forward outside the blocks and stay eager with the embedders.

Why regional. FLUX.1 repeats two block classes 19 and 38 times; compiling the whole model traces and
lowers all 57 copies (minutes on the first call). Compiling each block's forward instead traces one
double and one single block: torch >= 2.5 always inlines a module's parameters as graph inputs, so
every instance of a class runs the same compiled code (one graph per class, guarded on shapes and
dtypes, not on which block it is). The embedders, `Flux.forward` and the final layer stay eager:
they run once per forward and cost little. This is the "regional compilation" recipe of the PyTorch
tutorials (`torch.compiler` recipes: regional compilation).

How. `nn.Module.compile` keeps the module where it is and compiles its call in place, so module
names, `state_dict` keys and `strict=True` loading are unchanged (nothing is wrapped or renamed).

Edits. The seam passes an edit object (seam.py) into the block. Dynamo traces the edit's seam
method as ordinary Python: a FluxSpace edit's tensor work is compiled too, and its guards are on the
edit's class and its spec (concept count, tau_m > 0, ...), which are the same for every step of a run,
so a run compiles on its first edited step and never again. Python bookkeeping that changes every
call (lists of kept tensors, counters) would become guards that fail every step; such code is marked
`torch.compiler.disable` where it is defined (`MaskLog.add`, `Recorder.double_block/single_block`),
so it runs eagerly behind a graph break. An edit of your own that keeps state the same way should
mark it the same way, or it recompiles until torch's recompile limit (8 per function), after which
that function runs eagerly. The same limit counts edit configurations: each distinct structure (number
of concepts, tau_m > 0 or not, reference mode) compiles its own graphs of the block forward, so a
process that runs more than a few (benchmarks/edit_cost.py) raises torch._dynamo.config.recompile_limit.
Values that only enter tensor math (lambda_fine, lambda_coarse) do not recompile.

Letters: none; no tensor math here.
"""

import importlib
import shutil

import torch
from torch import nn

# nn.Module.compile (2.2) plus modules inlined as graph inputs, so that instances share one graph
# (torch._dynamo.config.inline_inbuilt_nn_modules, on by default since 2.5, always on since 2.6).
MIN_TORCH = (2, 5)


class CompileUnsupported(ValueError):
    """torch.compile cannot work here (old torch, no inductor, no compiler); the message says why."""


def check_compile_support(device: str | torch.device = "cpu", backend: str = "inductor") -> None:
    """Raise CompileUnsupported with a one-line reason if `backend` cannot compile for `device`."""
    version = torch.__version__.split("+")[0]
    if torch.torch_version.TorchVersion(version) < MIN_TORCH:
        raise CompileUnsupported(
            f"--compile needs torch >= {'.'.join(map(str, MIN_TORCH))} (regional compile shares one graph across "
            f"blocks from then on); this is torch {torch.__version__}: upgrade torch or run without --compile"
        )
    if backend != "inductor":
        return  # other backends (aot_eager, eager, ...) need no code generation
    device_type = torch.device(device).type
    try:
        config = importlib.import_module("torch._inductor.config")
    except ImportError as e:  # a stripped build
        raise CompileUnsupported(f"--compile needs torch's inductor backend, which does not import here ({e})") from None
    if device_type == "cpu":
        candidates = config.cpp.cxx if isinstance(config.cpp.cxx, list | tuple) else (config.cpp.cxx,)
        if not any(c and shutil.which(c) for c in candidates):
            raise CompileUnsupported(
                "--compile on the CPU needs a C++ compiler (torch inductor looks for "
                f"{', '.join(str(c) for c in candidates if c)}; set CXX or install g++); run without --compile"
            )
    elif device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise CompileUnsupported("--compile on CUDA needs triton, which this torch install lacks; "
                                     "install the triton matching torch, or run without --compile")  # fmt: skip
    elif device_type != "meta":
        raise CompileUnsupported(f"--compile supports cpu and cuda; got device {device_type}: run without --compile")


def _blocks(model: nn.Module) -> list[nn.Module]:
    if not (hasattr(model, "double_blocks") and hasattr(model, "single_blocks")):
        raise TypeError(
            f"compile_blocks expects a flux_core Flux or Flux2 (double_blocks, single_blocks); got {type(model).__name__}"
        )
    return [*model.double_blocks, *model.single_blocks]


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Compile every double and single block of `model` in place; returns `model`.

    compile_kwargs go to torch.compile (backend, mode, fullgraph, dynamic, options). The backend and
    device are checked first (check_compile_support). Calling it again recompiles with the new
    arguments.
    """
    blocks = _blocks(model)
    param = next(model.parameters(), None)
    check_compile_support(param.device if param is not None else "cpu", compile_kwargs.get("backend", "inductor"))
    for block in blocks:
        block.compile(**compile_kwargs)  # nn.Module.compile: in place, same names and state_dict keys
    return model

