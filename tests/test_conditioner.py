"""Text conditioning: T5 + CLIP through transformers, from a folder in the official FLUX.1 layout.

The folder is written once per session by `write_random_text_encoders` (tokenizers trained on its
built-in corpus, tiny seeded random encoders). The reference for parity is transformers itself,
called the way the official `HFEmbedder` calls it.
"""

import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from flux_core.conditioner import load_text_encoders
from flux_core.files import CheckpointError
from weights_tools.text_encoders import write_random_text_encoders

T5_DIM, CLIP_DIM, T5_MAX_LENGTH = 32, 16, 64
PROMPTS = ["a portrait of a smiling woman with glasses", "A red car parked near the sea at sunset"]
EXPECTED_LAYOUT = (
    "expected text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/ as in the official FLUX.1 repositories"
)


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    return write_random_text_encoders(
        tmp_path_factory.mktemp("te") / "flux", t5_dim=T5_DIM, clip_dim=CLIP_DIM
    )


@pytest.fixture(scope="session")
def encoders(folder):
    return load_text_encoders(folder, t5_max_length=T5_MAX_LENGTH)


def files(folder):
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_shapes_padding_and_frozen(encoders):
    txt, vec = encoders(PROMPTS)
    assert txt.shape == (2, T5_MAX_LENGTH, T5_DIM) and vec.shape == (2, CLIP_DIM)
    assert txt.dtype == vec.dtype == torch.float32
    assert not any(p.requires_grad for p in encoders.parameters())
    assert not encoders.t5.training and not encoders.clip.training

    ids = encoders.t5_token_ids(PROMPTS)
    assert ids.shape == (2, T5_MAX_LENGTH) and ids.dtype == torch.long
    tok = encoders.t5_tokenizer
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)  # T5's special ids
    for row in ids:
        n = int((row == tok.eos_token_id).nonzero()[0])  # the prompt, </s>, then padding
        assert 3 < n < T5_MAX_LENGTH - 1 and (row[n + 1 :] == tok.pad_token_id).all()
        assert (row[:n] != tok.pad_token_id).all()

    long_prompt = " ".join(["glasses"] * 200)  # cut to the fixed length, </s> kept last
    assert encoders.t5_token_ids([long_prompt])[0, -1] == tok.eos_token_id


def test_same_prompt_same_output_different_prompt_different_output(encoders):
    txt, vec = encoders([PROMPTS[0], PROMPTS[0], PROMPTS[1]])
    assert torch.equal(txt[0], txt[1]) and torch.equal(vec[0], vec[1])
    txt_again, vec_again = encoders([PROMPTS[0]])
    assert torch.equal(txt_again[0], txt[0]) and torch.equal(vec_again[0], vec[0])
    assert (txt[0] - txt[2]).abs().max() > 1e-3 and (vec[0] - vec[2]).abs().max() > 1e-3


def test_parity_with_transformers_called_as_the_official_hfembedder(encoders, folder):
    t5_tok = T5Tokenizer.from_pretrained(folder / "tokenizer_2", local_files_only=True)
    t5 = T5EncoderModel.from_pretrained(folder / "text_encoder_2", local_files_only=True).eval()
    clip_tok = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    clip = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True).eval()
    kwargs = dict(truncation=True, padding="max_length", return_tensors="pt")
    t5_ids = t5_tok(PROMPTS, max_length=T5_MAX_LENGTH, **kwargs).input_ids
    clip_ids = clip_tok(PROMPTS, max_length=77, **kwargs).input_ids
    with torch.no_grad():
        txt_ref = t5(input_ids=t5_ids).last_hidden_state
        vec_ref = clip(input_ids=clip_ids).pooler_output

    txt, vec = encoders(PROMPTS)
    assert torch.equal(encoders.t5_token_ids(PROMPTS), t5_ids)
    assert torch.equal(txt, txt_ref) and torch.equal(vec, vec_ref)


def test_clip_vector_is_taken_at_the_end_of_text_token(encoders):
    tok = encoders.clip_tokenizer
    ids = encoders.clip_token_ids(PROMPTS)
    assert ids.shape == (2, 77)
    assert (ids[:, 0] == tok.bos_token_id).all() and tok.pad_token_id == tok.eos_token_id
    with torch.no_grad():  # last_hidden_state is already after final_layer_norm
        hidden = encoders.clip(input_ids=ids).last_hidden_state  # (B, 77, C)
    vec = encoders.encode_clip(PROMPTS)
    for b, row in enumerate(ids):
        eos = int((row == tok.eos_token_id).nonzero()[0])  # the first one; padding repeats it
        assert 3 < eos < 70
        assert torch.equal(vec[b], hidden[b, eos])
        assert not torch.allclose(vec[b], hidden[b, eos - 1]) and not torch.allclose(vec[b], hidden[b, -1])


def test_clip_tokenizer_follows_clip_conventions(encoders):
    tok = encoders.clip_tokenizer
    assert tok("A RED Car").input_ids == tok("a red car").input_ids  # lower-cased
    tokens = tok.convert_ids_to_tokens(tok("a red car").input_ids)
    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>"
    assert tokens[1:-1] == ["a</w>", "red</w>", "car</w>"]
    assert (tok.bos_token_id, tok.eos_token_id) == (len(tok) - 2, len(tok) - 1)  # specials last, as in CLIP-L
    assert encoders.clip.config.eos_token_id == tok.eos_token_id


def test_word_token_positions_covers_every_piece_of_every_occurrence(encoders):
    prompt, word = "a portrait of a woman, a Portrait with glasses", "portrait"
    ids = encoders.t5_token_ids([prompt])[0]
    positions = encoders.word_token_positions(prompt, word)
    pieces = encoders.t5_tokenizer.convert_ids_to_tokens(ids[positions].tolist())
    assert len(positions) % 2 == 0  # two occurrences
    first, second = pieces[: len(pieces) // 2], pieces[len(pieces) // 2 :]
    assert len(first) >= 2, f"pick a word the tokenizer splits; {word!r} is {first}"
    assert first[0].startswith("▁") and second[0].startswith("▁")
    assert "".join(first).replace("▁", "") == "portrait" and "".join(second).replace("▁", "") == "Portrait"
    assert positions == sorted(positions) and positions[-1] < int((ids == 1).nonzero()[0])

    # A phrase covers both words; the neighbours of a word are not included.
    assert encoders.word_token_positions(prompt, "with glasses") == (
        encoders.word_token_positions(prompt, "with") + encoders.word_token_positions(prompt, "glasses")
    )
    of = encoders.word_token_positions(prompt, "of")
    assert not set(of) & set(positions)


def test_word_token_positions_refuses_an_absent_word(encoders):
    with pytest.raises(ValueError) as err:
        encoders.word_token_positions("a woman with glasses", "hat")
    assert str(err.value) == (
        "word 'hat' does not occur in the prompt 'a woman with glasses'; its words are ['a', 'woman', 'with', 'glasses']"
    )
    with pytest.raises(ValueError, match="word 'glass' does not occur"):  # whole words only
        encoders.word_token_positions("a woman with glasses", "glass")
    long_prompt = "a woman " * 40 + "with a hat"  # the hat lies past the 64 tokens kept
    with pytest.raises(
        ValueError, match=f"occurs in the prompt .* only after its first {T5_MAX_LENGTH} T5 tokens"
    ):
        encoders.word_token_positions(long_prompt, "hat")


@pytest.mark.parametrize(
    "missing, what",
    [
        ("tokenizer", "the CLIP tokenizer"),
        ("tokenizer_2", "the T5 tokenizer"),
        ("text_encoder_2", "the T5 encoder"),
    ],
)
def test_folder_layout_errors(tmp_path, missing, what):
    for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        if name != missing:
            (tmp_path / name).mkdir()
    with pytest.raises(FileNotFoundError) as err:
        load_text_encoders(tmp_path)
    assert str(err.value) == f"text-encoder folder {tmp_path} has no {missing}/ ({what}); {EXPECTED_LAYOUT}"


def test_float16_is_refused(folder):
    with pytest.raises(ValueError) as err:
        load_text_encoders(folder, dtype=torch.float16)
    assert str(err.value) == (
        "dtype torch.float16 is not supported for the text encoders: T5 overflows in float16; "
        "valid dtypes: torch.bfloat16, torch.float32"
    )


def test_writer_is_deterministic_and_atomic(folder, tmp_path):
    again = write_random_text_encoders(tmp_path / "again", t5_dim=T5_DIM, clip_dim=CLIP_DIM)
    assert files(again) == files(folder)  # byte-identical: tokenizers, configs and weights
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no temporary folder left behind

    other = write_random_text_encoders(tmp_path / "other", t5_dim=T5_DIM, clip_dim=CLIP_DIM, seed=1)
    for sub in ("text_encoder", "text_encoder_2"):
        a, b = load_file(folder / sub / "model.safetensors"), load_file(other / sub / "model.safetensors")
        random = [k for k in a if a[k].std() > 0]  # norms start at 1 and biases at 0 whatever the seed
        assert a.keys() == b.keys() and random and not any(torch.equal(a[k], b[k]) for k in random)


def test_writer_refuses_to_overwrite(folder, tmp_path):
    target = tmp_path / "flux"
    shutil.copytree(folder, target)
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError) as err:
        write_random_text_encoders(target, t5_dim=T5_DIM, clip_dim=CLIP_DIM)
    assert str(err.value) == f"{target} already exists and is not empty; pass overwrite=True to replace it"
    assert (target / "notes.txt").read_text() == "keep me"

    write_random_text_encoders(target, t5_dim=T5_DIM, clip_dim=CLIP_DIM, seed=1, overwrite=True)
    assert not (target / "notes.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["flux"]
    assert files(target).keys() == files(folder).keys()


def test_bfloat16_runs_close_to_float32(folder, encoders):
    bf16 = load_text_encoders(folder, t5_max_length=T5_MAX_LENGTH, dtype=torch.bfloat16)
    txt, vec = bf16(PROMPTS)
    assert txt.dtype == vec.dtype == torch.bfloat16
    txt32, vec32 = encoders(PROMPTS)
    assert (txt.float() - txt32).abs().max() < 0.1 and (vec.float() - vec32).abs().max() < 0.1


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_text_encoders(tmp_path / "nowhere")
    assert str(err.value) == (
        f"text-encoder folder {tmp_path / 'nowhere'} does not exist; expected a folder with "
        "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/ as in the official FLUX.1 repositories"
    )


def test_reference_lookup_keeps_one_token_where_ours_keeps_all(encoders):
    from fluxspace.spec import reference_token_position

    tok = encoders.t5_tokenizer
    word = "portrait"
    pieces = encoders.word_token_positions(word, word)
    assert len(pieces) >= 3  # the tiny tokenizer splits it ("▁", "port", "rai", "t")
    # The unofficial lookup: last character 't', first found at index 3 -> only the piece covering it.
    offsets = tok(word, return_offsets_mapping=True)["offset_mapping"]
    covering = [i for i, (a, b) in enumerate(offsets) if a <= 3 < b]
    assert reference_token_position(tok, word, word) == covering
    assert len(covering) == 1 and covering[0] in pieces


@pytest.mark.parametrize("sub, cls", [("text_encoder_2", "T5EncoderModel"), ("text_encoder", "CLIPTextModel")])
def test_pickle_only_encoder_is_refused_without_unpickling(folder, tmp_path, monkeypatch, sub, cls):
    target = tmp_path / "flux"
    shutil.copytree(folder, target)
    weights = target / sub / "model.safetensors"
    torch.save(load_file(weights), target / sub / "pytorch_model.bin")  # a real checkpoint transformers could load
    weights.unlink()

    def unpickle(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", unpickle)
    with pytest.raises(CheckpointError) as err:
        load_text_encoders(target, t5_max_length=T5_MAX_LENGTH)
    encoder = target / sub
    assert str(err.value) == (
        f"{encoder} holds only pickle weights (pytorch_model.bin), which are not loaded (unpickling can run "
        f"code); convert them once where you trust the file: python -c \"from transformers import {cls}; "
        f"{cls}.from_pretrained('{encoder}').save_pretrained('{encoder}')\" (save_pretrained writes "
        "model.safetensors by default), then remove the pickle"
    )


def test_encoder_without_weights_is_refused(folder, tmp_path):
    target = tmp_path / "flux"
    shutil.copytree(folder, target)
    (target / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        load_text_encoders(target)
    assert str(err.value) == (
        f"{target / 'text_encoder'} has no *.safetensors weights; expected a transformers model save "
        "(config.json and *.safetensors)"
    )
