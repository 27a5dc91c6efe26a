"""The small text grammars of the command line and the edits file, each parsed in one place.

    concept      WORD[:LAMBDA]          'eyeglasses', 'eyeglasses:5', 'red hair:-3'
    blocks       I | I-J, comma-joined  '0-9', '0,3,5', '0-2,7'
    step/time    an int is a step index, a number with a point a time t in [0, 1]: '2', '0.8'
    vary         NAME=V1,V2,...         'lambda_fine=0,2,4', 'start=0,2' (steps), 'start=0.9,0.8'

Each parser returns the value or raises ValueError with a message that names the flag, what was
given and what is valid; the CLI prints it as a one-line error before anything is loaded.
"""

import re

from .spec import Concept
from .sweep import SWEEPABLE

DEFAULT_LAMBDA = Concept.__dataclass_fields__["lambda_fine"].default
# Without a model at hand: more double blocks than any Flux has (FLUX.1 19, FLUX.2 8), so a range
# like 0-999999999999 is refused instead of expanded.
MAX_BLOCKS = 1024


def concept(text: str, tau_m: float, mask_words=None) -> Concept:
    """'eyeglasses' (lambda_fine 5) or 'eyeglasses:5' or 'red hair:-3'."""
    word, lam = text, DEFAULT_LAMBDA
    if text.count(":") > 1:
        raise ValueError(f"--edit {text!r} has more than one ':'; write WORD or WORD:LAMBDA (e.g. hat:5), one ':' at most")
    if ":" in text:
        word, _, value = text.rpartition(":")
        try:
            lam = float(value)
        except ValueError:
            raise ValueError(f"--edit {text!r}: the part after ':' must be a number (lambda_fine)") from None
    return Concept(prompt=word.strip(), lambda_fine=lam, tau_m=tau_m, mask_words=tuple(mask_words) if mask_words else None)


def blocks(text: str, limit: int = MAX_BLOCKS) -> tuple[int, ...]:
    """'0-9' or '0,3,5' or '0-2,7' -> the block indices in the order written; indices >= limit are
    refused before any range is expanded."""
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ValueError(f"--blocks: {part!r} is not an index or a range like 0-9")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise ValueError(f"--blocks: the range {part.strip()!r} runs backwards; write it as {b}-{a}")
        if b >= limit:
            raise ValueError(f"--blocks: block {b} is out of range; this model has double blocks 0..{limit - 1}")
        out.append(range(a, b + 1))
    return tuple(i for r in out for i in r)


def step_or_time(name: str, text: str) -> int | float:
    """'3' -> step 3; '0.75' -> t = 0.75 (name: the flag, for the message)."""
    text = text.strip()
    if re.fullmatch(r"\d+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--{name} must be a step index (e.g. 2) or a time in [0, 1] (e.g. 0.8); got {text!r}") from None


def vary(text: str) -> tuple[str, list]:
    """'lambda_fine=0,2.5,5' -> ('lambda_fine', [0.0, 2.5, 5.0]); start values stay ints when written as ints."""
    name, sep, values = text.partition("=")
    name = name.strip()
    if not sep:
        raise ValueError(f"--vary {text!r}: write NAME=V1,V2,... with NAME in {', '.join(SWEEPABLE)}")
    if name not in SWEEPABLE:
        raise ValueError(f"cannot sweep {name!r}; valid: {', '.join(SWEEPABLE)}")
    out = []
    for part in values.split(","):
        part = part.strip()
        try:
            out.append(int(part) if name == "start" and part.lstrip("-").isdigit() else float(part))
        except ValueError:
            raise ValueError(f"--vary {name}: {part!r} is not a number") from None
    return name, out
