"""Where the parts of a loaded model live and run: offload modes, the text device, staged loading.

A model has three parts that run one after the other: the text encoders (T5 and CLIP, `text`),
the transformer (`flow`) and the autoencoder (`ae`). Every entry point encodes all of its prompts
(base, prior, concepts, coarse, negative) first, then runs the transformer, then the autoencoder,
so at most one part needs the device at a time. A `Residency` says what to do with the others:

    offload "none"    every part stays on its device (the default: fastest, needs the most memory)
            "model"   parts live in host memory (pinned for CUDA); the part that runs is copied to its
                      device and the one that ran before is sent back
            "blocks"  as "model", and the transformer's blocks (and T5's, or the FLUX.2 LLM's layers)
                      are streamed to the device in groups while they run (flux_core/offload.py); CUDA only
    text_device       where T5 and CLIP run (default: the model's device); "cpu" keeps them off the GPU
    staged            load each part when it is first used and free it when another part is used, so
                      peak memory is that of the largest part, not of all three; a part used again is
                      read from its file again (in place: the module objects stay the same)

`Runtime` carries this out: FluxModels hands out a part through `runtime.use(name)`, which is the
only place parts move. The moves are counted (flux_core.offload.Mover), so tests on the CPU (where
a move to the "device" is a no-op) still see every move.
"""

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from flux_core.offload import BlockStreamer, Mover, stream_blocks

OFFLOAD_MODES = ("none", "model", "blocks")
PARTS = ("text", "flow", "ae")  # in the order a run uses them
# Blocks per streamed group: two groups are on the device at once (the running one and the next).
# FLUX.1-dev in bf16: a double block is 0.68 GB, a single block 0.28 GB.
DEFAULT_BLOCK_GROUP = 2
FLOW_BLOCK_LISTS = ("double_blocks", "single_blocks")


@dataclass(frozen=True)
class Residency:
    """The policy: which offload mode, where the text encoders run, whether parts load in stages."""

    offload: str = "none"
    text_device: str | None = None  # None: the model's device
    staged: bool = False
    block_group: int = DEFAULT_BLOCK_GROUP
    # Tests only: run the "blocks" schedule on the CPU (synchronous CPU-to-CPU copies, no stream).
    cpu_streaming: bool = False

    def check(self, device: str | torch.device) -> None:
        """Refuse, in one line, a policy that cannot work on `device`."""
        if self.offload not in OFFLOAD_MODES:
            raise ValueError(f"unknown offload mode {self.offload!r}; valid: {', '.join(OFFLOAD_MODES)}")
        if self.offload == "blocks" and torch.device(device).type != "cuda" and not self.cpu_streaming:
            raise ValueError(f"offload 'blocks' streams the transformer's blocks to a CUDA GPU from pinned memory "
                             f"on a side stream; the device is {device}: use offload 'model' or 'none'")  # fmt: skip
        if not isinstance(self.block_group, int) or self.block_group < 1:
            raise ValueError(f"block_group must be an int >= 1 (blocks per streamed group); got {self.block_group!r}")
        if self.text_device is not None:
            check_text_device(self.text_device)

    def device_of(self, part: str, device: str | torch.device) -> torch.device:
        """The device `part` runs on."""
        return torch.device(self.text_device) if part == "text" and self.text_device is not None else torch.device(device)

    def summary(self) -> dict:
        """What PNG metadata records."""
        return {"offload": self.offload, "text_device": self.text_device, "staged": self.staged}


def check_text_device(text: str) -> torch.device:
    """A device torch knows and this machine has, for the text encoders; a one-line error otherwise."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"text device {text!r} is not a device; valid: cpu, cuda, cuda:N, mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"text device {text}: this machine has no CUDA device; use cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"text device {text}: MPS is not available on this machine; use cpu")
    return device


def _streamed_lists(part: str, module: nn.Module) -> list[tuple[nn.Module, tuple[str, ...]]]:
    """(owner, attribute names) of the block lists that "blocks" streams: the transformer's two
    lists, T5's encoder blocks (transformers' T5Stack iterates `self.block`, as Flux.forward does) and
    the decoder layers of FLUX.2's LLM (`model.layers`, iterated as `layers[: num_hidden_layers]`)."""
    if part == "flow":
        return [(module, FLOW_BLOCK_LISTS)]
    if part == "text":
        return [(module.t5.encoder, ("block",))] if hasattr(module, "t5") else [(module.model, ("layers",))]
    return []


def resident_bytes(counts: dict[str, int], params, residency: Residency, device: str | torch.device,
                   dtype: torch.dtype, n_fp8: int = 0, text_layers: Sequence[int] = ()) -> int:  # fmt: skip
    """Bytes of weights on `device` at the peak, under `residency`. counts: parameters of each part
    (resources.part_weights); n_fp8: the transformer's weights held at one byte each (--weights fp8:
    its blocks' Linears; every other weight of every part is in `dtype`); text_layers: the text
    encoder's streamed layers (resources.text_layer_weights).

    Without staging, or offload to a host that is not the device, every part sits there (the text
    encoders only if they run there); otherwise one part at a time, and under "blocks" the transformer's
    blocks and the text encoder's layers only two groups at a time (the largest counted)."""
    from .resources import weight_bytes

    device = torch.device(device)
    on_device = {p: n for p, n in counts.items() if residency.device_of(p, device) == device}
    fp8 = {"flow": n_fp8} if "flow" in on_device else {}
    blocks = residency.offload == "blocks" and (residency.staged or device.type != "cpu")
    if blocks and "flow" in on_device:
        from flux_core import Flux
        from flux_core.flux2.model import Flux2, Flux2Params

        with torch.device("meta"):
            model = (Flux2 if isinstance(params, Flux2Params) else Flux)(params)
        sizes = [sum(p.numel() for p in b.parameters()) for b in (*model.double_blocks, *model.single_blocks)]
        if sizes:
            streamed = min(len(sizes), 2 * residency.block_group) * max(sizes)
            on_device["flow"] += streamed - sum(sizes)
            fp8["flow"] = n_fp8 * streamed // sum(sizes)  # the fp8 weights are the blocks'
    if blocks and "text" in on_device and text_layers:
        streamed = min(len(text_layers), 2 * residency.block_group) * max(text_layers)
        on_device["text"] += streamed - sum(text_layers)
    per_part = [weight_bytes(n, min(fp8.get(part, 0), n), dtype) for part, n in on_device.items()]
    # Offloading to host memory saves nothing when the host is the device.
    if not residency.staged and (residency.offload == "none" or device.type == "cpu"):
        return sum(per_part)
    return max(per_part, default=0)


class Runtime:
    """The parts of one loaded model, and the one place they are loaded, moved and freed.

    loaders[name](device) loads a part onto `device`; reloaders[name](module, device) reads its
    weights into the same module again (after staged freeing). use(name) returns the part ready to
    run on its device, sending back (or freeing, staged) the part that ran before.
    """

    def __init__(self, residency: Residency, device: str | torch.device,
                 loaders: dict[str, Callable[[torch.device], nn.Module]],
                 reloaders: dict[str, Callable[[nn.Module, torch.device], None]]):  # fmt: skip
        self.residency, self.device = residency, torch.device(device)
        self.loaders, self.reloaders = loaders, reloaders
        self.mover = Mover("cpu")
        self.modules: dict[str, nn.Module | None] = dict.fromkeys(PARTS)
        self.freed: set[str] = set()  # staged: loaded once, freed since (reloaded in place)
        self.streamers: dict[str, list[BlockStreamer]] = {}
        self.running: str | None = None
        self.loads: dict[str, int] = dict.fromkeys(PARTS, 0)  # file reads per part

    @property
    def offloads(self) -> bool:
        return self.residency.offload in ("model", "blocks")

    def home(self, part: str) -> torch.device:
        """Where a part lives when it is not running: host memory when offloading, else its device."""
        return torch.device("cpu") if self.offloads else self.residency.device_of(part, self.device)

    def load_all(self) -> None:
        """Load every part now (without staging: the loads happen at load_models)."""
        for part in PARTS:
            self._load(part)

    def is_loaded(self, part: str) -> bool:
        return self.modules[part] is not None and part not in self.freed

    def use(self, part: str) -> nn.Module:
        """The part, loaded and on the device it runs on; the part that ran before is sent back or freed."""
        if self.running == part:
            return self.modules[part]
        if self.running is not None:
            self._leave(self.running)
        self.running = part
        if not self.is_loaded(part):
            self._load(part)
        if self.offloads:
            self._bring(part)
        return self.modules[part]

    def release(self) -> None:
        """Send back (or free) the running part: nothing of this model stays on the device."""
        if self.running is not None:
            self._leave(self.running)
            self.running = None

    # -- internals
    def _load(self, part: str) -> None:
        where = self.home(part)
        module = self.modules[part]
        if module is not None and part in self.reloaders:  # staged: same objects, weights read again
            self.reloaders[part](module, where)
        else:
            module = self.loaders[part](where)
            self.modules[part] = module
            if self.offloads and self.residency.device_of(part, self.device).type == "cuda":
                self.mover.pin([module])  # host copies page-locked once: every later copy is DMA
            if self.residency.offload == "blocks":
                compute = self.residency.device_of(part, self.device)
                self.streamers[part] = [stream_blocks(owner, self.residency.block_group, self.mover, compute, lists,
                                                      name=f"{part}.blocks") for owner, lists in _streamed_lists(part, module)]  # fmt: skip
        self.freed.discard(part)
        self.loads[part] += 1

    def _streamed(self, part: str) -> list[nn.Module]:
        return [blk for owner, lists in _streamed_lists(part, self.modules[part]) for attr in lists
                for blk in getattr(owner, attr)._modules.values()]  # fmt: skip

    def _bring(self, part: str) -> None:
        compute = self.residency.device_of(part, self.device)
        if self.residency.offload == "blocks":  # the rest now; the blocks as they run
            self.mover.bring(part, [self.modules[part]], compute, exclude=self._streamed(part))
        else:
            self.mover.bring(part, [self.modules[part]], compute)

    def _leave(self, part: str) -> None:
        if self.offloads:
            for streamer in self.streamers.get(part, []):
                streamer.release()
            self.mover.send_back(part)
        if self.residency.staged:
            self._free(part)

    def _free(self, part: str) -> None:
        module = self.modules[part]
        if part in self.reloaders:
            module.to("meta")  # the module objects stay (a sampler may hold them); their memory goes
            self.freed.add(part)
        else:
            self.modules[part] = None
            self.streamers.pop(part, None)
        del module
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
