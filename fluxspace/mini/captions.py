"""Captions for the flux-mini domain: varied templates over a known set of stated facts.

A caption states some of the attributes (a random subset, in random order) in one of several shapes:
bare keyword lists ("blond, eyeglasses, smile"), tag lists, full sentences ("a cartoon portrait of a person
with red hair and a hat on a blue background"), "wearing ..." sentences; EMPTY_FRACTION of captions are
empty, for classifier-free guidance. Every stated value is written with its canonical KEYWORD (the word
FluxSpace edits use: "eyeglasses", "sunglasses", "hat", "smile", "frown", "beard", "sketch"); there are
no synonyms, so a keyword means one thing. Absences are never stated (no "without glasses"): a caption
that does not mention an accessory leaves it open, and "none" values cannot be prompted.
"""

import re

import numpy as np

from .attributes import FAMILIES, Attributes, sample_attributes

EMPTY_FRACTION = 0.10
FULL_FRACTION = 0.3  # non-empty captions that state every (present) attribute

# The canonical keyword of each value that can be stated; it appears verbatim in every phrase of it.
KEYWORD: dict[tuple[str, str], str] = {
    **{("skin", v): f"{v} skin" for v in FAMILIES["skin"]},
    **{("hair", v): v for v in FAMILIES["hair"]},
    **{("face", v): f"{v} face" for v in FAMILIES["face"]},
    **{("background", v): f"{v} background" for v in FAMILIES["background"]},
    ("eyewear", "eyeglasses"): "eyeglasses",
    ("eyewear", "sunglasses"): "sunglasses",
    ("hat", "hat"): "hat",
    ("mouth", "smile"): "smile",
    ("mouth", "frown"): "frown",
    ("mouth", "neutral"): "neutral",
    ("beard", "beard"): "beard",
    ("style", "flat"): "flat colour",
    ("style", "sketch"): "sketch",
}
assert all(((f, v) in KEYWORD) == (v != "none") for f, vs in FAMILIES.items() for v in vs)

# How a value reads after "with" (first phrase = the canonical one used by prompt_for).
_WITH = {
    "skin": ["{v} skin", "a {v} skin tone"],
    "hair": ["{v} hair"],
    "face": ["a {v} face"],
    "background": ["a {v} background"],
    "eyewear": ["{v}", "a pair of {v}"],
    "hat": ["a hat"],
    "mouth": {
        "smile": ["a smile", "a big smile"],
        "frown": ["a frown"],
        "neutral": ["a neutral expression", "a neutral mouth"],
    },
    "beard": ["a beard", "a full beard"],
}
# How a value reads in a bare keyword list.
_BARE = {
    "skin": ["{v} skin"],
    "hair": ["{v}", "{v} hair"],
    "face": ["{v} face"],
    "background": ["{v} background"],
    "eyewear": ["{v}"],
    "hat": ["hat"],
    "mouth": {"smile": ["smile"], "frown": ["frown"], "neutral": ["neutral expression", "neutral"]},
    "beard": ["beard"],
    "style": {"flat": ["flat colour"], "sketch": ["sketch", "line-art sketch"]},
}
_OPENERS = {  # sentence heads; the style, when stated, chooses among its own
    None: ["a cartoon portrait of", "a drawing of", "a picture of", "a cartoon of", "an avatar of", ""],
    "flat": ["a flat colour drawing of", "a flat colour portrait of", "a flat colour cartoon of"],
    "sketch": ["a line-art sketch of", "a pencil sketch of", "a sketch of"],
}
_STYLE_TAILS = {"flat": [", flat colour", " in flat colour"], "sketch": [", sketch", " in sketch style"]}
_SUBJECTS = ["a person", "someone", "a character", "a cartoon person"]
_BACKGROUND_TAILS = ["on a {v} background", "against a {v} background", "with a {v} background"]
_TAG_PREFIXES = ["portrait", "cartoon face", "avatar", "face"]
_WEARABLE = ("eyewear", "hat")
_WEARING = {"eyewear": "{v}", "hat": "a hat"}


def _pick(rng, options):
    return options[rng.integers(len(options))]


def _phrase(table, family, value, rng):
    options = table[family]
    if isinstance(options, dict):
        options = options[value]
    return _pick(rng, options).format(v=value)


def _join(parts: list[str], rng) -> str:
    """'a, b and c' or 'a, b, c'."""
    if len(parts) > 1 and rng.random() < 0.7:
        return ", ".join(parts[:-1]) + " and " + parts[-1]
    return ", ".join(parts)


def _articles(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)  # "a oval face" -> "an oval face"


def caption_with_facts(attrs: Attributes, rng: np.random.Generator) -> tuple[str, dict[str, str]]:
    """A caption of `attrs` and the facts it states ({family: value}, every one true of `attrs`)."""
    if rng.random() < EMPTY_FRACTION:
        return "", {}
    present = [f for f, v in attrs.as_dict().items() if (f, v) in KEYWORD]
    p = 1.0 if rng.random() < FULL_FRACTION else rng.uniform(0.2, 0.9)
    stated = [f for f in present if rng.random() < p] or [_pick(rng, present)]
    stated = [stated[i] for i in rng.permutation(len(stated))]  # random order
    facts = {f: getattr(attrs, f) for f in stated}
    shape = rng.integers(5)
    if shape == 0:  # bare keywords: "blond, eyeglasses, smile"
        text = ", ".join(_phrase(_BARE, f, facts[f], rng) for f in stated)
    elif shape == 1:  # tags: "portrait, red hair, a hat"
        text = ", ".join([_pick(rng, _TAG_PREFIXES)] + [_phrase(_BARE, f, facts[f], rng) for f in stated])
    else:  # sentences
        text = _sentence(facts, stated, rng, wearing=shape == 3, noun_only=shape == 4)
    return _articles(text), facts


def _sentence(facts, order, rng, wearing: bool, noun_only: bool) -> str:
    style, background = facts.get("style"), facts.get("background")
    rest = [f for f in order if f not in ("style", "background")]
    style_in_opener = style is not None and rng.random() < 0.6
    opener = _pick(rng, _OPENERS[style if style_in_opener else None])
    worn = [f for f in rest if f in _WEARABLE] if wearing else []
    with_parts = [_phrase(_WITH, f, facts[f], rng) for f in rest if f not in worn]
    background_tail = None
    if background is not None:
        if rng.random() < 0.3:  # sometimes the background is just one more thing in the list
            with_parts.insert(rng.integers(len(with_parts) + 1), f"a {background} background")
        else:
            background_tail = _pick(rng, _BACKGROUND_TAILS).format(v=background)
    if noun_only and with_parts:  # "red hair, a hat and a smile on a blue background"
        body = _join(with_parts, rng)
        if style_in_opener:
            body = f"{opener} {_pick(rng, _SUBJECTS)} with {body}"
    else:
        body = " ".join(w for w in (opener, _pick(rng, _SUBJECTS)) if w)
        if worn:
            body += " wearing " + _join([_WEARING[f].format(v=facts[f]) for f in worn], rng)
            if with_parts:
                body += ","
        if with_parts:
            body += " with " + _join(with_parts, rng)
    if background_tail:
        body += " " + background_tail
    if style is not None and not style_in_opener:
        body += _pick(rng, _STYLE_TAILS[style])
    return body


def caption(attrs: Attributes, rng: np.random.Generator) -> str:
    """A caption of `attrs` (see caption_with_facts for what it states)."""
    return caption_with_facts(attrs, rng)[0]


def prompt_for(stated: dict[str, str]) -> str:
    """The canonical prompt stating exactly `stated` ({family: value}); {} gives the empty prompt.

    "a cartoon portrait of a person with blond hair, eyeglasses and a smile on a blue background"
    """
    for family, value in stated.items():
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")
        if value not in FAMILIES[family]:
            raise ValueError(f"{family}={value!r} is not a valid value; valid: {', '.join(FAMILIES[family])}")
        if (family, value) not in KEYWORD:
            raise ValueError(
                f"{family}={value!r} cannot be prompted: captions never state absences; leave {family} out"
            )
    if not stated:
        return ""
    style = stated.get("style")
    opener = _OPENERS[style][0] if style else _OPENERS[None][0]
    parts = [_first(f, stated[f]) for f in FAMILIES if f in stated and f not in ("style", "background")]
    text = f"{opener} a person"
    if parts:
        text += " with " + (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0])
    if "background" in stated:
        text += f" on a {stated['background']} background"
    return _articles(text)


def _first(family, value):
    options = _WITH[family]
    return (options[value] if isinstance(options, dict) else options)[0].format(v=value)


def phrases(family: str, value: str) -> list[str]:
    """Every phrase the captions write a value with, the bare keyword first (edit prompts to try)."""
    found = [KEYWORD[family, value]]
    for table in (_BARE, _WITH):
        options = table.get(family, [])
        for option in options[value] if isinstance(options, dict) else options:
            text = option.format(v=value)
            if text not in found:
                found.append(text)
    return found


def states(caption_text: str, family: str, value: str) -> bool:
    """Whether the caption contains the value's keyword as whole words."""
    return re.search(rf"\b{re.escape(KEYWORD[family, value])}\b", caption_text) is not None


def caption_corpus(n: int, seed: int = 0) -> list[str]:
    """n non-empty captions of random attribute sets (all combinations: it only teaches words), for
    training the tokenizers. Deterministic in seed."""
    rng = np.random.default_rng(seed)
    corpus = []
    while len(corpus) < n:
        text = caption(sample_attributes(rng), rng)
        if text:
            corpus.append(text)
    return corpus
