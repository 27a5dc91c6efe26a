"""Text conditioning of FLUX.2: hidden states of several layers of a decoder LLM, stacked per token.

- FLUX.2 [dev]: Mistral-Small-3.x (official `src/flux2/text_encoder.py`, `Mistral3SmallEmbedder`):
  the prompt in a chat with the official system message (`SYSTEM_MESSAGE` of
  `src/flux2/system_messages.py`), padded to 512 tokens, hidden states of layers 10, 20, 30
  (`OUTPUT_LAYERS`), 3 x 5120 = 15360 channels a token.
- FLUX.2 [klein]: Qwen3 (diffusers `Flux2KleinPipeline._get_qwen3_prompt_embeds`; the official
  repository has no klein code at the snapshot read): the prompt as the one user message, the chat
  template with `add_generation_prompt=True, enable_thinking=False`, padded to 512 tokens, layers 9,
  18, 27.
In both the padded sequence runs with its attention mask; `hidden_states[k]` is the output of
decoder layer k (index 0 is the token embedding), so no final norm is applied. The layers are
stacked along channels, layer-major: token features = [layer a | layer b | layer c]
(official `rearrange(stack(dim=1), "b c l d -> b l (c d)")`).

The official dev encoder is a `Mistral3ForConditionalGeneration` (the multimodal Mistral-Small-3.x)
called with text only, so only its language model runs. We load the same class from the folder and
keep only that text part (`model.language_model`, a MistralModel; no vision tower, no LM head),
which gives the same hidden states (tests/test_flux2_conditioner.py checks it against the full
model called as the official code calls it). For klein we keep `Qwen3ForCausalLM.model`.

Tokenisation: the official dev code calls the Pixtral processor's `apply_chat_template(...,
tokenize=True)`, which renders the chat template and tokenises the text without adding special
tokens when the rendered text already starts with BOS (transformers processing_utils). For text-only
prompts that is the tokenizer alone, so we render with the tokenizer and tokenise the same way: the
Pixtral processor also needs torchvision, which nothing else here does.

Models load from a local folder laid out like the Hugging Face FLUX.2 repositories (`text_encoder/`,
`tokenizer/`), safetensors only; nothing is downloaded.

Letters: B batch, T text tokens (max_length), D LLM hidden size, K stacked layers.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor, nn

from ..conditioner import _check_safetensors_weights, word_spans

# src/flux2/system_messages.py SYSTEM_MESSAGE (also diffusers pipelines/flux2/system_messages.py).
SYSTEM_MESSAGE = """You are an AI that reasons about image descriptions. You give structured responses focusing on object relationships, object
attribution and actions without speculation."""


@dataclass(frozen=True)
class TextEncoderSpec:
    """How one FLUX.2 variant turns prompts into features."""

    llm: str  # what the folder must hold, for messages
    model_type: str  # text_encoder/config.json "model_type"
    model_class: str  # the transformers class the checkpoint is saved as
    output_layers: tuple[int, ...]  # indices into hidden_states (0 = embeddings)
    max_length: int  # prompts are padded / cut to this many tokens
    system_message: str | None  # dev: a system turn; klein: none


SPECS = {
    # text_encoder.py: OUTPUT_LAYERS = [10, 20, 30], MAX_LENGTH = 512.
    "dev": TextEncoderSpec(
        "Mistral-Small-3.x", "mistral3", "Mistral3ForConditionalGeneration", (10, 20, 30), 512, SYSTEM_MESSAGE
    ),
    # pipeline_flux2_klein.py: hidden_states_layers=(9, 18, 27), max_sequence_length=512.
    "klein": TextEncoderSpec("Qwen3", "qwen3", "Qwen3ForCausalLM", (9, 18, 27), 512, None),
}
# Stands in for the prompt when locating it in the rendered chat (a private-use character).
_MARKER = "\ue000"
LAYOUT = {"text_encoder": "the LLM (config.json, *.safetensors)", "tokenizer": "its tokenizer"}
VALID_DTYPES = (torch.bfloat16, torch.float32)


def get_spec(variant: str) -> TextEncoderSpec:
    if variant not in SPECS:
        raise ValueError(f"unknown FLUX.2 text-encoder variant {variant!r}; valid: {', '.join(SPECS)}")
    return SPECS[variant]


def conversation(prompt: str, spec: TextEncoderSpec) -> list[dict]:
    """The chat one prompt is encoded as."""
    if spec.system_message is None:  # klein: diffusers passes plain-string content
        return [{"role": "user", "content": prompt}]
    # dev (official format_input): "[IMG]" is removed from prompts (the Pixtral processor would count
    # it as an image placeholder).
    return [
        {"role": "system", "content": [{"type": "text", "text": spec.system_message}]},
        {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]},
    ]


class Flux2TextEncoder(nn.Module):
    """A frozen LLM (text part) with its tokenizer: prompts -> txt (B, T, K*D)."""

    def __init__(self, model: nn.Module, tokenizer, spec: TextEncoderSpec):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.spec = spec

    def _template_kwargs(self) -> dict:
        if self.spec.system_message is None:  # klein, as Flux2KleinPipeline._get_qwen3_prompt_embeds
            return {"add_generation_prompt": True, "enable_thinking": False}
        return {"add_generation_prompt": False}  # dev, as the official Mistral3SmallEmbedder.forward

    def render(self, prompt: str) -> str:
        """The chat one prompt is encoded as, rendered by the tokenizer's template (not yet tokenised)."""
        return self.tokenizer.apply_chat_template(
            conversation(prompt, self.spec), tokenize=False, **self._template_kwargs()
        )

    def _tokenize_texts(self, texts: list[str], **extra):
        bos = self.tokenizer.bos_token
        # As the processor's apply_chat_template: no second BOS when the template already wrote one.
        add_special = not (bos is not None and texts[0].startswith(bos))
        return self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.spec.max_length,
                              add_special_tokens=add_special, **extra)  # fmt: skip

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """input_ids and attention_mask, (B, max_length) each: chat template, then padded / cut."""
        if isinstance(prompts, str):
            prompts = [prompts]
        batch = self._tokenize_texts([self.render(p) for p in prompts], return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    def word_token_positions(self, prompt: str, word: str) -> list[int]:
        """Positions, in the padded templated sequence of `prompt`, of every sub-token of every whole-word
        occurrence of `word` (FluxSpace's keyword mask; as flux_core.conditioner.TextEncoders' for T5).

        The prompt sits inside the chat (system turn, role markers), so positions count from the
        template's first token. The prompt's place in the rendered text is found by rendering the chat
        once more with a marker in its place; tokens are matched by the tokenizer's character offsets.
        """
        content = prompt if self.spec.system_message is None else prompt.replace("[IMG]", "")
        spans = word_spans(content, word)
        text, marked = self.render(prompt), self.render(_MARKER)
        start = marked.find(_MARKER)
        if start < 0 or text[:start] != marked[:start] or text[start : start + len(content)] != content:
            raise ValueError(
                f"cannot find the prompt {prompt!r} in its chat template; keyword positions need it verbatim"
            )
        offsets = self._tokenize_texts([text], return_offsets_mapping=True)["offset_mapping"][0]
        # Padding has the empty span (0, 0) and never overlaps a word.
        positions = [
            i for i, (a, b) in enumerate(offsets) if any(a < start + e and b > start + s for s, e in spans)
        ]
        if not positions:
            raise ValueError(
                f"word {word!r} occurs in the prompt {prompt!r} only after the first {self.spec.max_length} "
                "tokens of its chat, which are cut off; shorten the prompt"
            )
        return positions

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Tensor:
        """txt (B, max_length, K*D): the chosen layers' hidden states, layer-major per token."""
        ids, mask = self.tokenize(prompts)  # (B, T) each
        device = self.model.embed_tokens.weight.device
        out = self.model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            output_hidden_states=True,
            use_cache=False,
        )
        hidden = torch.stack([out.hidden_states[k] for k in self.spec.output_layers], dim=1)  # (B, K, T, D)
        return rearrange(hidden, "B K T D -> B T (K D)")  # (B, T, K*D)


def check_folder(folder: str | os.PathLike, spec: TextEncoderSpec) -> Path:
    """Check `folder` has text_encoder/ (spec's model type, safetensors) and tokenizer/; raise naming the problem."""
    folder = Path(folder)
    expected = f"expected a folder with text_encoder/ ({spec.llm}) and tokenizer/ as in the Hugging Face FLUX.2 repositories"
    if not folder.is_dir():
        raise FileNotFoundError(f"text-encoder folder {folder} does not exist; {expected}")
    missing = [f"{name}/ ({what})" for name, what in LAYOUT.items() if not (folder / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"text-encoder folder {folder} has no {', no '.join(missing)}; {expected}")
    config = folder / "text_encoder" / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"{folder / 'text_encoder'} has no config.json; expected a transformers save of {spec.llm}"
        )
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type != spec.model_type:
        valid = ", ".join(f"{v}: {s.model_type} ({s.llm})" for v, s in SPECS.items())
        raise ValueError(
            f"{config} is a {model_type!r} model but this FLUX.2 variant needs {spec.model_type!r} ({spec.llm}); "
            f"model types by variant: {valid}"
        )
    _check_safetensors_weights(folder / "text_encoder", spec.model_class)
    return folder


def load_text_encoder(
    folder: str | os.PathLike,
    variant: str = "dev",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> Flux2TextEncoder:
    """Load the FLUX.2 text encoder of `variant` ("dev": Mistral-Small-3.x, "klein": Qwen3) from a local folder.

    dtype: torch.bfloat16 (as the official code runs) or torch.float32.
    """
    spec = get_spec(variant)
    if dtype not in VALID_DTYPES:
        raise ValueError(
            f"dtype {dtype} is not supported for the text encoder; valid dtypes: torch.bfloat16, torch.float32"
        )
    folder = check_folder(folder, spec)
    import transformers
    from transformers import AutoTokenizer

    cls = getattr(transformers, spec.model_class)
    full = cls.from_pretrained(
        folder / "text_encoder", dtype=dtype, local_files_only=True, use_safetensors=True
    )
    # The text part only: Mistral3ForConditionalGeneration.model.language_model / Qwen3ForCausalLM.model.
    model = full.model.language_model if spec.model_type == "mistral3" else full.model
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    if tokenizer.chat_template is None:
        raise ValueError(
            f"the tokenizer in {folder / 'tokenizer'} has no chat template; FLUX.2 encodes prompts as a chat"
        )
    n_layers = model.config.num_hidden_layers
    if max(spec.output_layers) > n_layers:
        raise ValueError(
            f"the {spec.llm} in {folder} has {n_layers} layers; FLUX.2 {variant} reads layers {spec.output_layers}"
        )
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer in {folder} has {len(tokenizer)} tokens but the LLM embeds only {model.config.vocab_size}: "
            "the tokenizer and text_encoder folders come from different models"
        )
    return Flux2TextEncoder(model, tokenizer, spec).to(device)
