"""FLUX.2 text conditioning against the reference computations, on tiny random LLMs saved offline.

dev: a tiny `Mistral3ForConditionalGeneration` (the official class) with 30 text layers, compared with
the official `Mistral3SmallEmbedder.forward` transcribed below and with diffusers'
`Flux2Pipeline._get_mistral_3_small_prompt_embeds`; both take a processor, here a text-only
`ProcessorMixin` running transformers' processor `apply_chat_template` (the Pixtral processor
itself needs torchvision, which is not installed). klein: a tiny `Qwen3ForCausalLM` with 27 layers,
compared with diffusers' `Flux2KleinPipeline._get_qwen3_prompt_embeds` called as the pipeline does.
The chat templates are short stand-ins shaped like the real ones (the real files carry their own).
"""

import json

import pytest
import torch
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from einops import rearrange
from transformers import Mistral3ForConditionalGeneration, ProcessorMixin, Qwen3ForCausalLM

from flux_core.files import CheckpointError
from flux_core.flux2.conditioner import SPECS, SYSTEM_MESSAGE, load_text_encoder
from flux_core.flux2.sampling import prepare, txt_ids
from weights_tools.text_encoders import MISTRAL_TEMPLATE, write_random_mistral3, write_random_qwen3

PROMPTS = ["a portrait of a smiling woman with glasses", "A red car parked near the sea at sunset [IMG]"]


@pytest.fixture(scope="module")
def dev_folder(tmp_path_factory):
    """A tiny random Mistral3ForConditionalGeneration (text width 16, 30 layers) and its tokenizer."""
    return write_random_mistral3(tmp_path_factory.mktemp("flux2") / "dev", hidden=16, layers=30, seed=0)


@pytest.fixture(scope="module")
def klein_folder(tmp_path_factory):
    """A tiny random Qwen3 (width 16, 27 layers) and its tokenizer."""
    return write_random_qwen3(tmp_path_factory.mktemp("flux2") / "klein", hidden=16, layers=27, seed=1)


class TextOnlyProcessor(ProcessorMixin):
    """A processor with a tokenizer only: its apply_chat_template is transformers' processor code path."""

    attributes = ["tokenizer"]
    tokenizer_class = "AutoTokenizer"

    def __init__(self, tokenizer=None, chat_template=None):
        super().__init__(tokenizer, chat_template=chat_template)

    def __call__(self, text=None, **kwargs):
        for media in ("images", "videos", "audio"):  # None for text-only chats
            kwargs.pop(media, None)
        return self.tokenizer(text, **kwargs)


def official_dev_forward(model, processor, txt: list[str]) -> torch.Tensor:
    """src/flux2/text_encoder.py Mistral3SmallEmbedder.forward (and format_input), names apart."""
    cleaned_txt = [prompt.replace("[IMG]", "") for prompt in txt]
    messages_batch = [[{"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
                       {"role": "user", "content": [{"type": "text", "text": prompt}]}] for prompt in cleaned_txt]  # fmt: skip
    inputs = processor.apply_chat_template(messages_batch, add_generation_prompt=False, tokenize=True, return_dict=True,
                                           return_tensors="pt", padding="max_length", truncation=True, max_length=512)  # fmt: skip
    output = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], output_hidden_states=True,
                   use_cache=False)  # fmt: skip
    out = torch.stack([output.hidden_states[k] for k in [10, 20, 30]], dim=1)
    return rearrange(out, "b c l d -> b l (c d)")


def test_specs_are_the_official_facts():
    assert SPECS["dev"].output_layers == (10, 20, 30) and SPECS["dev"].max_length == 512
    assert SPECS["klein"].output_layers == (9, 18, 27) and SPECS["klein"].max_length == 512
    assert SPECS["dev"].system_message == SYSTEM_MESSAGE and SPECS["klein"].system_message is None


def test_dev_equals_official_and_diffusers(dev_folder):
    ours = load_text_encoder(dev_folder, "dev", dtype=torch.float32)
    full = Mistral3ForConditionalGeneration.from_pretrained(
        dev_folder / "text_encoder", dtype=torch.float32
    ).eval()
    processor = TextOnlyProcessor(ours.tokenizer, chat_template=MISTRAL_TEMPLATE)
    with torch.no_grad():
        txt = ours(PROMPTS)
        ref = official_dev_forward(full, processor, PROMPTS)
        ref_diffusers = Flux2Pipeline._get_mistral_3_small_prompt_embeds(
            full, processor, PROMPTS, max_sequence_length=512
        )
    assert txt.shape == (2, 512, 3 * 16)
    assert torch.equal(txt, ref) and torch.equal(txt, ref_diffusers)
    # The text part only: no vision tower, no LM head.
    assert not any("vision" in k or "lm_head" in k for k in ours.state_dict())
    ids, mask = ours.tokenize(PROMPTS)
    tok = ours.tokenizer
    assert (
        ids[0, 0] == tok.bos_token_id and (ids[0] == tok.bos_token_id).sum() == 1
    )  # one BOS, the template's
    assert int(mask[0].sum()) < 512 and (ids[0, int(mask[0].sum()) :] == tok.pad_token_id).all()
    assert SYSTEM_MESSAGE.split()[3] in tok.decode(ids[0]) and "[IMG]" not in tok.decode(ids[1])


def test_klein_equals_diffusers(klein_folder):
    ours = load_text_encoder(klein_folder, "klein", dtype=torch.float32)
    full = Qwen3ForCausalLM.from_pretrained(klein_folder / "text_encoder", dtype=torch.float32).eval()
    with torch.no_grad():
        txt = ours(PROMPTS)
        ref = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            full, ours.tokenizer, PROMPTS, max_sequence_length=512
        )
    assert txt.shape == (2, 512, 3 * 16)
    assert torch.equal(txt, ref)
    text = ours.tokenizer.decode(ours.tokenize(PROMPTS[:1])[0][0])
    assert text.startswith(
        "<|im_start|>user\n" + PROMPTS[0] + "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>"
    )
    # Text ids as the pipelines build them: (0, 0, 0, index).
    inp = prepare(torch.zeros(2, 128, 2, 2), txt)
    assert torch.equal(inp.txt_ids, Flux2KleinPipeline._prepare_text_ids(txt)) and torch.equal(
        inp.txt_ids, txt_ids(2, 512)
    )


def test_bf16_default_and_frozen(klein_folder):
    ours = load_text_encoder(klein_folder, "klein")
    assert ours(PROMPTS[:1]).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in ours.parameters()) and not ours.model.training


def test_errors(tmp_path, dev_folder, klein_folder):
    with pytest.raises(ValueError, match=r"^unknown FLUX.2 text-encoder variant 'pro'; valid: dev, klein$"):
        load_text_encoder(klein_folder, "pro")
    with pytest.raises(
        FileNotFoundError,
        match=r"does not exist; expected a folder with text_encoder/ \(Qwen3\) and tokenizer/",
    ):
        load_text_encoder(tmp_path / "nowhere", "klein")
    (tmp_path / "half" / "text_encoder").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer/ \(its tokenizer\)"):
        load_text_encoder(tmp_path / "half", "dev")
    with pytest.raises(
        ValueError, match=r"is a 'qwen3' model but this FLUX.2 variant needs 'mistral3' \(Mistral-Small-3.x\)"
    ):
        load_text_encoder(klein_folder, "dev")
    with pytest.raises(ValueError, match=r"^dtype torch.float16 is not supported"):
        load_text_encoder(klein_folder, "klein", dtype=torch.float16)
    # Pickle-only weights are refused with the conversion to run.
    pickled = tmp_path / "pickled"
    (pickled / "text_encoder").mkdir(parents=True)
    (pickled / "tokenizer").mkdir()
    (pickled / "text_encoder" / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    (pickled / "text_encoder" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(
        CheckpointError, match=r"holds only pickle weights \(pytorch_model.bin\).*Qwen3ForCausalLM"
    ):
        load_text_encoder(pickled, "klein")
