"""The command line's small grammars (fluxspace/grammar.py), and the CLI covering every EditSpec field."""

import dataclasses

import pytest

from fluxspace import grammar
from fluxspace.arguments import CONCEPT_FLAGS, SPEC_ARGS, build_parser, spec_from
from fluxspace.spec import Concept, EditSpec


def test_concepts():
    assert grammar.concept("hat", 0.5) == Concept("hat", 5.0, 0.5, None)
    assert grammar.concept("red hair:-3", 0.0, ["hair"]) == Concept("red hair", -3.0, 0.0, ("hair",))
    with pytest.raises(ValueError, match=r"--edit 'hat:5:3' has more than one ':'; write WORD or WORD:LAMBDA"):
        grammar.concept("hat:5:3", 0.5)  # ambiguous: refused, not run as the concept "hat:5"


@pytest.mark.parametrize("text", ["hat:big", "hat:", "hat:1e", "hat:--2"])
def test_bad_concepts(text):
    with pytest.raises(ValueError, match=r"--edit .*: the part after ':' must be a number \(lambda_fine\)"):
        grammar.concept(text, 0.5)


def test_blocks():
    assert grammar.blocks("0-2,7") == (0, 1, 2, 7)
    assert grammar.blocks(" 3 ") == (3,)
    assert grammar.blocks("4-4") == (4,)


@pytest.mark.parametrize(
    "text, message",
    [
        ("a", r"--blocks: 'a' is not an index or a range like 0-9"),
        ("1-", r"--blocks: '1-' is not an index or a range like 0-9"),
        ("-1", r"--blocks: '-1' is not an index or a range like 0-9"),
        ("1,,2", r"--blocks: '' is not an index or a range like 0-9"),
        ("", r"--blocks: '' is not an index or a range like 0-9"),
        ("1.5", r"--blocks: '1.5' is not an index"),
        ("5-2", r"--blocks: the range '5-2' runs backwards; write it as 2-5"),
        ("0-999999999999", r"--blocks: block 999999999999 is out of range; this model has double blocks 0..1023"),
    ],
)
def test_bad_blocks(text, message):
    with pytest.raises(ValueError, match=message):
        grammar.blocks(text)


def test_step_or_time():
    assert grammar.step_or_time("start", "3") == 3 and isinstance(grammar.step_or_time("start", "3"), int)
    assert grammar.step_or_time("end", "0.75") == 0.75
    assert grammar.step_or_time("start", "1.0") == 1.0 and isinstance(grammar.step_or_time("start", "1.0"), float)


@pytest.mark.parametrize("text", ["x", "", "1-2", "0.5.1"])
def test_bad_step_or_time(text):
    with pytest.raises(ValueError, match=r"--start must be a step index \(e.g. 2\) or a time in \[0, 1\] \(e.g. 0.8\)"):
        grammar.step_or_time("start", text)


def test_vary():
    assert grammar.vary("lambda_fine=0,2.5") == ("lambda_fine", [0.0, 2.5])
    assert grammar.vary("start=0, 2") == ("start", [0, 2])
    assert grammar.vary("start=0.9,0.8") == ("start", [0.9, 0.8])


@pytest.mark.parametrize(
    "text, message",
    [
        ("lambda_fine", r"--vary 'lambda_fine': write NAME=V1,V2,... with NAME in lambda_fine, lambda_coarse, tau_m, start"),
        ("gamma=1,2", r"cannot sweep 'gamma'; valid: lambda_fine, lambda_coarse, tau_m, start"),
        ("tau_m=a", r"--vary tau_m: 'a' is not a number"),
        ("tau_m=", r"--vary tau_m: '' is not a number"),
        ("tau_m=1,,2", r"--vary tau_m: '' is not a number"),
    ],
)
def test_bad_vary(text, message):
    with pytest.raises(ValueError, match=message):
        grammar.vary(text)


def test_every_edit_field_has_a_flag_and_a_file_key():
    # A field added to EditSpec or Concept without a flag fails here (and build_parser refuses to run).
    assert set(SPEC_ARGS) == {f.name for f in dataclasses.fields(EditSpec)} - {"concepts"}
    assert set(CONCEPT_FLAGS) == {f.name for f in dataclasses.fields(Concept)}


def test_every_edit_field_set_by_flag(tmp_path):
    flags = ["--edit", "hat:3", "--tau", "0.25", "--mask-words", "hat", "--lambda-coarse", "0.5", "--coarse-prompt",
             "a hat", "--start", "2", "--end", "0.2", "--blocks", "0-1", "--prior", "a face", "--projection",
             "before_proj", "--coarse-target", "both", "--prior-removal", "difference", "--reference"]  # fmt: skip
    spec = spec_from(build_parser().parse_args(["edit", "x", *flags]))
    assert spec == EditSpec(
        concepts=(Concept("hat", 3.0, 0.25, ("hat",)),), lambda_coarse=0.5, coarse_prompt="a hat", start=2, end=0.2,
        blocks=(0, 1), prior_prompt="a face", projection="before_proj", coarse_target="both",
        prior_removal="difference", reference=True,
    )  # fmt: skip


def test_every_edit_field_set_in_the_file_and_flags_win(tmp_path):
    toml = tmp_path / "edits.toml"
    toml.write_text(
        'lambda_coarse = 0.5\ncoarse_prompt = "a hat"\nstart = 0.9\nend = 4\nblocks = [0, 1]\nprior_prompt = "a face"\n'
        'projection = "before_proj"\ncoarse_target = "global"\nprior_removal = "none"\nreference = false\n'
        '[[concept]]\nprompt = "hat"\nlambda_fine = 3\ntau_m = 0.0\nmask_words = ["hat"]\n'
    )
    args = build_parser().parse_args(["edit", "x", "--edits-file", str(toml), "--blocks", "1", "--start", "1"])
    spec = spec_from(args)
    assert spec == EditSpec(
        concepts=(Concept("hat", 3, 0.0, ("hat",)),), lambda_coarse=0.5, coarse_prompt="a hat", start=1, end=4,
        blocks=(1,), prior_prompt="a face", projection="before_proj", coarse_target="global", prior_removal="none",
    )  # fmt: skip
    toml.write_text('blocks = "0-2"\n[[concept]]\nprompt = "hat"\n')
    assert spec_from(build_parser().parse_args(["edit", "x", "--edits-file", str(toml)])).blocks == (0, 1, 2)
