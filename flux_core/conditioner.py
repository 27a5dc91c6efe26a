"""Text conditioning of FLUX.1: T5 token features (`txt`) and the pooled CLIP vector (`vec`).

Mirrors `HFEmbedder` in the official `flux/modules/conditioner.py` and `load_t5` / `load_clip` in
`flux/util.py` (black-forest-labs/flux): T5 v1.1-XXL encoder `last_hidden_state` over prompts padded
to `t5_max_length` (512 dev, 256 schnell), CLIP-L `pooler_output` (not the projection) over 77
tokens, both without an attention mask, so padding tokens are attended to as in the official code.
The models come from `transformers` and load from a local folder laid out like the official FLUX.1
repositories; nothing is downloaded. Weights are read from safetensors only: a `pytorch_model.bin` is
a pickle, which can run code when loaded, so a folder that has nothing else is refused with the
one-line conversion to run (tokenizer files are JSON and sentencepiece protobuf, not pickles).

Letters: B batch, T text tokens, C channels.
"""

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .files import CheckpointError

if TYPE_CHECKING:  # transformers takes seconds to import: only load_text_encoders needs it to run
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

CLIP_MAX_LENGTH = 77  # CLIP-L position table; official `load_clip` uses max_length=77

# Subfolders of black-forest-labs/FLUX.1-dev (and -schnell) and what each holds.
LAYOUT = {
    "text_encoder": "the CLIP text encoder",
    "text_encoder_2": "the T5 encoder",
    "tokenizer": "the CLIP tokenizer",
    "tokenizer_2": "the T5 tokenizer",
}
# The layout itself, for code that writes or checks these folders (cheap to import: no transformers).
TEXT_ENCODER_FOLDERS = tuple(LAYOUT)  # text_encoder, text_encoder_2, tokenizer, tokenizer_2
# T5 overflows in float16 (its feed-forward activations exceed 65504), so fp16 is refused.
VALID_DTYPES = (torch.bfloat16, torch.float32)
# The transformers class of each encoder folder (named in the conversion hint for a pickle-only folder).
ENCODER_CLASSES = {"text_encoder": "CLIPTextModel", "text_encoder_2": "T5EncoderModel"}
# Pickle-based weight files (torch.save): never loaded, only recognised to say how to convert them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class TextEncoders(nn.Module):
    """Frozen T5 and CLIP text encoders with their tokenizers: prompts -> (txt, vec)."""

    def __init__(
        self,
        t5: "T5EncoderModel",
        clip: "CLIPTextModel",
        t5_tokenizer: "T5Tokenizer",
        clip_tokenizer: "CLIPTokenizer",
        t5_max_length: int,
        clip_max_length: int = CLIP_MAX_LENGTH,
    ):
        super().__init__()
        # The official code freezes both (`hf_module.eval().requires_grad_(False)`).
        self.t5 = t5.eval().requires_grad_(False)
        self.clip = clip.eval().requires_grad_(False)
        self.t5_tokenizer = t5_tokenizer
        self.clip_tokenizer = clip_tokenizer
        self.t5_max_length = t5_max_length
        self.clip_max_length = clip_max_length

    def forward(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """txt (B, T, C_t5) and vec (B, C_clip) for a batch of prompts."""
        return self.encode_t5(prompts), self.encode_clip(prompts)

    def t5_token_ids(self, prompts: list[str]) -> Tensor:
        """T5 ids (B, t5_max_length): the prompt, </s>, then <pad> up to the fixed length."""
        return _token_ids(self.t5_tokenizer, prompts, self.t5_max_length)

    def clip_token_ids(self, prompts: list[str]) -> Tensor:
        """CLIP ids (B, 77): <|startoftext|>, the prompt, then <|endoftext|> up to the fixed length."""
        return _token_ids(self.clip_tokenizer, prompts, self.clip_max_length)

    @torch.no_grad()  # no_grad, not inference_mode: the outputs may feed a training step
    def encode_t5(self, prompts: list[str]) -> Tensor:
        ids = self.t5_token_ids(prompts).to(self.t5.device)  # (B, T)
        return self.t5(input_ids=ids, attention_mask=None).last_hidden_state  # (B, T, C)

    @torch.no_grad()
    def encode_clip(self, prompts: list[str]) -> Tensor:
        ids = self.clip_token_ids(prompts).to(self.clip.device)  # (B, 77)
        # pooler_output: the final-layer-norm state at the first <|endoftext|> token.
        return self.clip(input_ids=ids, attention_mask=None).pooler_output  # (B, C)

    def word_token_positions(self, prompt: str, word: str) -> list[int]:
        """Positions in the padded T5 sequence of `prompt` of every sub-token of every occurrence of `word`.

        FluxSpace builds its attention mask from the keyword's tokens (averaging the attention over
        them), so a word split into pieces must contribute all of them. Occurrences are whole words,
        matched case-insensitively; `word` may be a phrase ("red hair"). Sentencepiece glues the
        word-start marker "▁" to the first piece ("▁glass", "es") or emits it alone ("▁", "port",
        "rait"); the tokenizer's offsets give a lone "▁" the span of the next character, so it counts
        as part of the word it opens.
        """
        spans = word_spans(prompt, word)
        offsets = self.t5_tokenizer(
            prompt,
            padding="max_length",
            truncation=True,
            max_length=self.t5_max_length,
            return_offsets_mapping=True,
        )["offset_mapping"]
        # Special tokens (</s>, <pad>) have the empty span (0, 0) and never overlap a word.
        positions = [
            i for i, (a, b) in enumerate(offsets) if any(a < end and b > start for start, end in spans)
        ]
        if not positions:
            raise ValueError(
                f"word {word!r} occurs in the prompt {prompt!r} only after its first {self.t5_max_length} "
                "T5 tokens, which are cut off; shorten the prompt or raise t5_max_length"
            )
        return positions


def word_spans(prompt: str, word: str) -> list[tuple[int, int]]:
    """Character spans of every whole-word, case-insensitive occurrence of `word` (or a phrase) in
    `prompt`; raise a ValueError listing the prompt's words if there is none. Shared by FLUX.2's
    text encoder, whose keyword positions are found the same way (flux2/conditioner.py)."""
    pattern = rf"(?<!\w){re.escape(word.strip())}(?!\w)"
    spans = [m.span() for m in re.finditer(pattern, prompt, flags=re.IGNORECASE)] if word.strip() else []
    if not spans:
        words = re.findall(r"\w+", prompt)
        raise ValueError(f"word {word!r} does not occur in the prompt {prompt!r}; its words are {words}")
    return spans


def _token_ids(tokenizer, prompts: list[str], max_length: int) -> Tensor:
    if isinstance(prompts, str):
        prompts = [prompts]
    # The official HFEmbedder tokenises exactly so: fixed length, cut off what does not fit.
    batch = tokenizer(
        list(prompts),
        truncation=True,
        max_length=max_length,
        padding="max_length",
        return_tensors="pt",
    )
    return batch["input_ids"]  # (B, T)


def check_text_encoder_folder(folder: str | os.PathLike) -> Path:
    """Check that `folder` has the official FLUX.1 text-encoder layout; raise naming what is missing."""
    folder = Path(folder)
    expected = ", ".join(f"{name}/" for name in LAYOUT) + " as in the official FLUX.1 repositories"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"text-encoder folder {folder} does not exist; expected a folder with {expected}"
        )
    missing = [f"{name}/ ({what})" for name, what in LAYOUT.items() if not (folder / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"text-encoder folder {folder} has no {', no '.join(missing)}; expected {expected}"
        )
    for name in ENCODER_CLASSES:
        if not (folder / name / "config.json").is_file():
            raise FileNotFoundError(
                f"{folder / name} has no config.json; expected a transformers model save "
                f"(config.json and *.safetensors) of {LAYOUT[name]}"
            )
        _check_safetensors_weights(folder / name, ENCODER_CLASSES[name])
    return folder


def _check_safetensors_weights(encoder: Path, cls: str) -> None:
    """Refuse an encoder folder without .safetensors weights, saying how to convert a pickle-only one."""
    if any(encoder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in encoder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickles:
        raise CheckpointError(
            f"{encoder} has no *.safetensors weights; expected a transformers model save "
            "(config.json and *.safetensors)"
        )
    raise CheckpointError(
        f"{encoder} holds only pickle weights ({', '.join(pickles)}), which are not loaded (unpickling can "
        f"run code); convert them once where you trust the file: python -c \"from transformers import {cls}; "
        f"{cls}.from_pretrained('{encoder}').save_pretrained('{encoder}')\" "
        "(save_pretrained writes model.safetensors by default), then remove the pickle"
    )


def load_text_encoders(
    folder: str | os.PathLike,
    t5_max_length: int = 512,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TextEncoders:
    """Load T5 and CLIP from a local folder laid out like black-forest-labs/FLUX.1-dev.

    t5_max_length: 512 for dev, 256 for schnell (the preset's `t5_max_length`).
    dtype: torch.bfloat16 (as the official code runs) or torch.float32.
    """
    if dtype not in VALID_DTYPES:
        raise ValueError(
            f"dtype {dtype} is not supported for the text encoders: T5 overflows in float16; "
            "valid dtypes: torch.bfloat16, torch.float32"
        )
    if not isinstance(t5_max_length, int) or t5_max_length < 1:
        raise ValueError(
            f"t5_max_length must be a positive int (512 dev, 256 schnell), got {t5_max_length!r}"
        )
    folder = check_text_encoder_folder(folder)
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

    # use_safetensors=True: transformers never falls back to a pickle (checked above with a clearer message).
    kwargs = {"dtype": dtype, "local_files_only": True, "use_safetensors": True}
    t5 = T5EncoderModel.from_pretrained(folder / "text_encoder_2", **kwargs)
    clip = CLIPTextModel.from_pretrained(folder / "text_encoder", **kwargs)
    t5_tokenizer = T5Tokenizer.from_pretrained(folder / "tokenizer_2", local_files_only=True)
    clip_tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    for name, tokenizer, model in (("T5", t5_tokenizer, t5), ("CLIP", clip_tokenizer, clip)):
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(
                f"the {name} tokenizer in {folder} has {len(tokenizer)} tokens but its encoder embeds only "
                f"{model.config.vocab_size}: the tokenizer and encoder folders come from different models"
            )
    if clip.config.max_position_embeddings < CLIP_MAX_LENGTH:
        raise ValueError(
            f"the CLIP encoder in {folder} has {clip.config.max_position_embeddings} positions; "
            f"FLUX.1 feeds it {CLIP_MAX_LENGTH} tokens"
        )
    return TextEncoders(t5, clip, t5_tokenizer, clip_tokenizer, t5_max_length).to(device)
