"""Offload: keep weights in a storage place (host memory) and move them to the device that runs them.

Performance tooling (STYLE rule 9): nothing here is in the model files. It works on the module tree
from outside and needs nothing of the model but its frozen weights (inference only: a weight is
never changed on the device, so sending it back is dropping the device copy, not copying it back).

    Mover           moves the tensors of modules between storage and a compute device, and counts
                    every move by name. On a CPU-only machine storage and compute are both the CPU:
                    the moves are no-ops, but they are counted all the same, so a test proves which
                    part was on its compute device when.
    BlockStreamer   one pass over a transformer's blocks in groups: while group g runs, group g+1 is
                    copied in (on a side CUDA stream, from pinned host memory, ordered by events), and
                    the groups before g are sent back. At most two groups are on the device.
    stream_blocks   puts a streamer under a model's block lists (Flux.double_blocks, single_blocks),
                    so that the model's own forward, which iterates them, streams its blocks.

Why a block-list wrapper and no hooks (STYLE rule 7): Flux.forward runs `for block in
self.double_blocks`; `StreamedBlocks` is an nn.ModuleList holding the same blocks (so the
state_dict, the keys and the edit seam are unchanged) whose iteration brings each group in before
its first block is handed out. Iterating is the one thing the forward does with the list, so the
model file stays as it is and nothing is registered on any module. Indexing (`blocks[i]`) does not
stream: code that calls a block by index outside a streamed forward must bring it in itself. A slice
of the whole list is the list (transformers' decoders iterate `self.layers[: num_hidden_layers]`);
a slice of part of it is refused.
"""

from collections import Counter
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn


def _tensors(modules: Iterable[nn.Module], exclude: Iterable[nn.Module] = ()) -> list[Tensor]:
    """Every parameter and buffer of the modules, each once (tied weights are one tensor), but those of `exclude`."""
    seen, out = {id(t) for m in exclude for t in (*m.parameters(), *m.buffers())}, []
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


class Mover:
    """Moves named groups of modules between a storage device and compute devices, and counts it.

    bring(name, modules, device): each tensor's data becomes a copy on `device`; the storage copy is
    kept here until send_back(name) makes it the tensor's data again (the device copy is dropped).
    With pin=True (the default when storage is the CPU and a CUDA device computes) storage copies
    are pinned the first time they are brought, so later copies are asynchronous DMA.

    moves[(name, "in")] / moves[(name, "out")] count the moves; `log` lists them in order.
    """

    def __init__(self, storage: str | torch.device = "cpu", pin: bool | None = None):
        self.storage = torch.device(storage)
        self.pin_storage = pin
        self.moves: Counter[tuple[str, str]] = Counter()
        self.log: list[tuple[str, str]] = []
        self._away: dict[str, tuple[list[Tensor], list[Tensor]]] = {}  # name -> (tensors, storage copies)

    def pin(self, modules: Iterable[nn.Module]) -> None:
        """Page-lock the modules' CPU tensors now (else each is pinned the first time it is brought)."""
        with torch.inference_mode(False), torch.no_grad():
            for t in _tensors(modules):
                if t.data.device.type == "cpu" and not t.data.is_pinned():
                    t.data = t.data.pin_memory()

    def is_in(self, name: str) -> bool:
        return name in self._away

    def bring(self, name: str, modules: Iterable[nn.Module], device: str | torch.device,
              stream: "torch.cuda.Stream | None" = None, exclude: Iterable[nn.Module] = ()) -> None:  # fmt: skip
        """Copy the modules' tensors, but those of `exclude`, to `device` (on `stream` if given: the
        caller orders it)."""
        if name in self._away:
            return
        device = torch.device(device)
        pin = self.pin_storage if self.pin_storage is not None else (device.type == "cuda" and self.storage.type == "cpu")
        tensors = _tensors(modules, exclude)
        stored = []
        # Weights are moved outside inference mode: a copy made inside it would be an inference
        # tensor, which the text encoders' no_grad code (and any training) could not use.
        with torch.inference_mode(False), torch.no_grad():
            for t in tensors:
                host = t.data
                if pin and host.device.type == "cpu" and not host.is_pinned():
                    host = host.pin_memory()
                stored.append(host)
                if stream is None:
                    t.data = host.to(device, non_blocking=pin)
                else:
                    with torch.cuda.stream(stream):
                        t.data = host.to(device, non_blocking=True)
        self._away[name] = (tensors, stored)
        self._count(name, "in")

    def send_back(self, name: str, after: "torch.cuda.Stream | None" = None) -> None:
        """Make the storage copies the tensors' data again; the device copies are freed.

        after: the stream whose queued work still reads the device copies (their memory is not
        reused before that work is done)."""
        if name not in self._away:
            return
        tensors, stored = self._away.pop(name)
        with torch.inference_mode(False), torch.no_grad():
            for t, host in zip(tensors, stored, strict=True):
                if after is not None and t.data.device.type == "cuda":
                    t.data.record_stream(after)
                t.data = host
        self._count(name, "out")

    def send_back_all(self, prefix: str = "") -> None:
        for name in [n for n in self._away if n.startswith(prefix)]:
            self.send_back(name)

    def _count(self, name: str, direction: str) -> None:
        self.moves[(name, direction)] += 1
        self.log.append((name, direction))


class BlockStreamer:
    """Streams a transformer's blocks, in groups of `group_size`, to `device` for each pass over them.

    Group g holds blocks [g * group_size, (g + 1) * group_size) of `blocks` (all double blocks, then
    all single blocks, as Flux.forward runs them). `enter(g)` is called before group g's first block
    runs: it waits for group g (copying it now if it was not prefetched), sends back every other
    group, and starts copying group g + 1 (after the last group: group 0, for the next forward).
    On CUDA the copies run on a side stream and the compute stream waits on an event per group;
    on the CPU (tests) they are plain synchronous copies with the same schedule.

    Mover names: f"{name}.{g}". `resident` is the set of groups on the device (at most two).
    """

    def __init__(self, blocks: list[nn.Module], group_size: int, mover: Mover, device: str | torch.device,
                 name: str = "blocks"):  # fmt: skip
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1; got {group_size}")
        self.groups = [blocks[i : i + group_size] for i in range(0, len(blocks), group_size)]
        self.group_size, self.mover, self.name = group_size, mover, name
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.side = torch.cuda.Stream(self.device) if cuda else None
        self.ready: dict[int, torch.cuda.Event | None] = {}  # groups copied in or being copied

    @property
    def resident(self) -> set[int]:
        return set(self.ready)

    def _fetch(self, g: int) -> None:
        if g in self.ready:
            return
        if self.side is None:
            self.mover.bring(f"{self.name}.{g}", self.groups[g], self.device)
            self.ready[g] = None
            return
        # The side stream must not overwrite memory the compute stream is still reading.
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        self.mover.bring(f"{self.name}.{g}", self.groups[g], self.device, stream=self.side)
        event = torch.cuda.Event()
        event.record(self.side)
        self.ready[g] = event

    def _evict(self, g: int) -> None:
        self.ready.pop(g, None)
        compute = torch.cuda.current_stream(self.device) if self.side is not None else None
        self.mover.send_back(f"{self.name}.{g}", after=compute)

    def enter(self, g: int) -> None:
        """Group g is about to run."""
        self._fetch(g)
        event = self.ready[g]
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            for t in _tensors(self.groups[g]):  # allocated on the side stream, used on this one
                t.data.record_stream(torch.cuda.current_stream(self.device))
            self.ready[g] = None
        nxt = (g + 1) % len(self.groups)
        for h in [h for h in self.ready if h not in (g, nxt)]:
            self._evict(h)
        self._fetch(nxt)

    def release(self) -> None:
        """Send every group back (another part needs the device)."""
        for g in list(self.ready):
            self._evict(g)


class StreamedBlocks(nn.ModuleList):
    """The same blocks as a model's block list; iterating brings each group in first (see the module doc).

    first: the index, among all the streamer's blocks, of this list's block 0.
    """

    def __init__(self, blocks: nn.ModuleList, streamer: BlockStreamer, first: int = 0):
        super().__init__(blocks)
        self.streamer, self.first = streamer, first

    def __getitem__(self, idx):
        """An index gives the block (not streamed); a slice of the whole list gives the list itself, so
        that a decoder iterating `self.layers[: config.num_hidden_layers]` (transformers' LLMs) streams."""
        if isinstance(idx, slice):
            if range(len(self))[idx] != range(len(self)):
                raise ValueError(f"a streamed block list streams whole passes; the slice {idx} takes part of it")
            return self
        return super().__getitem__(idx)

    def __iter__(self) -> Iterator[nn.Module]:
        size = self.streamer.group_size
        for i, block in enumerate(super().__iter__()):
            k = self.first + i
            if k % size == 0 or i == 0:
                self.streamer.enter(k // size)
            yield block


def stream_blocks(model: nn.Module, group_size: int, mover: Mover, device: str | torch.device,
                  lists: tuple[str, ...] = ("double_blocks", "single_blocks"), name: str = "blocks") -> BlockStreamer:  # fmt: skip
    """Replace the model's block lists (in the order its forward runs them) by StreamedBlocks over one
    BlockStreamer, and return it. The weights themselves are not moved here. Undo with unstream_blocks."""
    blocks, first = [], {}
    for attr in lists:
        first[attr] = len(blocks)
        blocks += list(getattr(model, attr))
    streamer = BlockStreamer(blocks, group_size, mover, device, name)
    for attr in lists:
        setattr(model, attr, StreamedBlocks(getattr(model, attr), streamer, first[attr]))
    return streamer


def unstream_blocks(model: nn.Module, lists: tuple[str, ...] = ("double_blocks", "single_blocks")) -> None:
    """Put plain nn.ModuleLists back (after streamer.release())."""
    for attr in lists:
        current = getattr(model, attr)
        if isinstance(current, StreamedBlocks):
            setattr(model, attr, nn.ModuleList(current))
