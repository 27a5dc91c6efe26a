"""FluxSpace on FLUX.2: the one implementation (fluxspace/step.py) through the seam of flux_core/flux2/blocks.py,
sampled by flux_core.flux2.sampling.denoise(..., edit=).

Invariants: zero scales (or an edit that never switches on) are bit-identical to plain FLUX.2 sampling;
the edit moves only the generated image tokens (reference images' tokens and the text stream keep their
plain attention outputs unless edit_condition); the edit direction is orthogonal to the prior branch's
attention, computed here the slow way; masks average every sub-token of a keyword inside FLUX.2's
chat-templated sequence; timing; several concepts in one pass; the coarse edit refused with one message.
Tiny random FLUX.2 (tests/tiny.py), float32, CPU.
"""

import dataclasses
import math

import edit_probe
import pytest
import torch
from tiny import tiny_flux2
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from flux_core.flux2.conditioner import SPECS, SYSTEM_MESSAGE, Flux2TextEncoder
from flux_core.flux2.sampling import denoise, get_schedule, img_ids, prepare_references, txt_ids
from flux_core.math import apply_rope
from flux_core.seam import ModVectors
from fluxspace.projection import concept_mask, keyword_attention, orthogonal_component
from fluxspace.spec import Concept, EditSpec, EncodedEdit, encode_edit, validate
from fluxspace.step import FluxSpaceEdit, FluxSpaceSchedule
from weights_tools.text_encoders import (
    BUILTIN_CORPUS,
    MISTRAL_SPECIALS,
    MISTRAL_TEMPLATE,
    QWEN3_SPECIALS,
    QWEN3_TEMPLATE,
    train_byte_bpe,
)

h, w, T = 3, 4, 5  # 12 generated image tokens, 5 text tokens
N = h * w
REF = (2, 3)  # one reference image of 2 x 3 tokens
COARSE_REFUSAL = (
    "FluxSpace's coarse edit (lambda_coarse) moves the pooled text vector, and this model has none "
    "(FLUX.2 modulates by time and guidance only): set lambda_coarse=0 and edit with the fine edit"
)


def encoded(model, n_concepts=1, seed=2, length=T) -> EncodedEdit:
    """Random branch text features (prior + concepts); FLUX.2 has no pooled vector: coarse_pool None."""
    g = torch.Generator().manual_seed(seed)
    txt = torch.randn(1 + n_concepts, length, model.params.context_in_dim, generator=g)
    return EncodedEdit(txt, None, [[1, 2]] * n_concepts)


def fine(*lambdas, tau=0.4, **options) -> EditSpec:
    return EditSpec(
        concepts=tuple(Concept(f"c{i}", lam, tau_m=tau) for i, lam in enumerate(lambdas)), **options
    )


def inputs(model, B=2, references=False, seed=1) -> dict:
    """Model inputs as flux2.sampling builds them (int64 ids); with references, a 2 x 3 reference image's
    tokens after the generated ones (t = 10)."""
    g = torch.Generator().manual_seed(seed)
    p = model.params
    img, ids = torch.randn(B, N, p.in_channels, generator=g), img_ids(B, h, w)
    if references:
        refs = prepare_references([torch.randn(1, p.in_channels, *REF, generator=g)], batch=B)
        img, ids = torch.cat([img, refs.img], dim=1), torch.cat([ids, refs.ids], dim=1)
    return dict(img=img, img_ids=ids, timesteps=torch.tensor([0.9, 0.4][:B]),
                txt=torch.randn(B, T, p.context_in_dim, generator=g), txt_ids=txt_ids(B, T),
                guidance=torch.full((B,), 4.0))  # fmt: skip


def sample(model, schedule=None, steps=4, references=False, seed=3, callback=None):
    g = torch.Generator().manual_seed(seed)
    p = model.params
    x = torch.randn(1, N, p.in_channels, generator=g)
    txt = torch.randn(1, T, p.context_in_dim, generator=g)
    refs = prepare_references([torch.randn(1, p.in_channels, *REF, generator=g)]) if references else None
    edit = {} if schedule is None else {"edit": schedule}
    return denoise(model, x, img_ids(1, h, w), txt, txt_ids(1, T), get_schedule(steps, N), 4.0,
                   references=refs, callback=callback, progress=False, **edit)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return tiny_flux2()


# ---------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(
    "spec",
    [fine(0.0), fine(0.0, 0.0), fine(5.0, start=0.0)],  # start=0.0 is a time: on for t <= 0, never
    ids=["zero-scale", "zero-scales-two-concepts", "start-after-last-step"],
)
def test_inactive_edits_are_bit_identical_to_plain_sampling(model, spec):
    plain = sample(model)
    assert torch.equal(plain, sample(model, FluxSpaceSchedule(spec, encoded(model, len(spec.concepts)))))
    refs = sample(model, references=True)
    assert torch.equal(
        refs, sample(model, FluxSpaceSchedule(spec, encoded(model, len(spec.concepts))), references=True)
    )


def test_edit_changes_the_image_only_while_it_is_on(model):
    steps, seen = 4, {}

    def keep(name):
        return lambda step, t, t_next, img, pred: seen.setdefault(name, []).append(img.clone())

    sample(model, steps=steps, callback=keep("plain"))
    schedule = FluxSpaceSchedule(fine(4.0, start=2, end=3), encoded(model), keep_masks=True)
    sample(model, schedule, steps=steps, callback=keep("edited"))
    same = [torch.equal(a, b) for a, b in zip(seen["plain"], seen["edited"], strict=True)]
    assert same == [True, True, False, False]  # plain before step 2, edited from it on
    assert schedule.masks.count == model.params.depth  # one edited step, every double block
    assert {step for step, _, _ in schedule.masks.entries} == {2}
    # Given as times: on while end < t <= start.
    ts = get_schedule(steps, N)
    by_time = FluxSpaceSchedule(fine(4.0, start=float(ts[1]), end=float(ts[3])), encoded(model))
    sample(model, by_time, steps=steps)
    assert by_time.masks.count == 2 * model.params.depth  # steps 1 and 2
    (mask,) = by_time.masks.mean()
    assert mask.shape == (1, N) and 0 < mask.mean() < 1


def test_edit_moves_only_the_generated_image_tokens(model):
    inp = inputs(model, references=True)
    M = REF[0] * REF[1]
    spec = fine(3.0)
    spies = []
    edit_probe.run_step(model, spec, encoded(model), inp, spies, n_generated=N)
    for i, (edited, plain) in spies[0].outputs.items():
        moved = (edited - plain).abs().amax(dim=-1)  # (B, N + M)
        assert moved.shape == (2, N + M)
        assert moved[:, :N].max() > 1e-3, f"block {i}: the generated tokens did not move"
        # The reference tokens keep the plain output, up to the shared-key merge's float32 rounding.
        assert moved[:, N:].max() < 1e-5, f"block {i}: a reference token moved by {moved[:, N:].max():.2e}"
        txt_edited, txt_plain = spies[0].txt_outputs[i]
        torch.testing.assert_close(txt_edited, txt_plain, rtol=1e-5, atol=1e-6)  # the text stream: untouched
    # edit_condition: the reference tokens are edited too.
    spies = []
    edit_probe.run_step(
        model, dataclasses.replace(spec, edit_condition=True), encoded(model), inp, spies, n_generated=N
    )
    for i, (edited, plain) in spies[0].outputs.items():
        assert (edited - plain)[:, N:].abs().max() > 1e-3, (
            f"block {i}: edit_condition left the references alone"
        )
    # Sampling with a reference image: the edit changes the image; the masks are the generated grid's.
    schedule = FluxSpaceSchedule(spec, encoded(model), n_generated=N)
    assert not torch.equal(sample(model, references=True), sample(model, schedule, references=True))
    assert schedule.mean_masks((h, w))[0].shape == (h, w)


def naive_branch_attention(model, inp, branch_txt, img_in) -> list[torch.Tensor]:
    """edit_probe.naive_branch_attention on FLUX.2: its double blocks take (img, txt, pe, mods), the
    shared modulations computed once from the conditioning vector."""
    with torch.inference_mode():
        vec = model.conditioning(inp["timesteps"], inp["guidance"])
        mods = model.modulations(ModVectors(img=vec, txt=vec, out=vec))
        pe = model.pe_embedder(torch.cat((inp["txt_ids"], inp["img_ids"]), dim=1))
    return edit_probe.naive_branch_attention(model, inp, branch_txt, img_in, vec, (pe, mods))


def test_edit_direction_is_the_component_orthogonal_to_the_prior():
    model = tiny_flux2(depth=3)
    inp, enc = inputs(model), encoded(model, n_concepts=2)
    spies = []
    _, got = edit_probe.run_step(model, fine(2.0, -1.5, tau=0.0), enc, inp, spies)
    img_in = spies[0].img_in
    a_prior, a_1, a_2 = (
        naive_branch_attention(model, inp, enc.branch_txt[k : k + 1], img_in) for k in range(3)
    )
    for i in range(3):
        a_hat, a_base = got[i]
        d1, d2 = orthogonal_component(a_1[i], a_prior[i]), orthogonal_component(a_2[i], a_prior[i])
        expected = a_base + 2.0 * d1 - 1.5 * d2
        err = ((a_hat - expected).norm() / expected.norm()).item()
        assert err <= 1e-5, f"block {i}: relative error {err:.2e} against the naive branches"
        cos = torch.nn.functional.cosine_similarity(a_hat - a_base, a_prior[i], dim=-1)  # (B, N)
        assert cos.abs().max() <= 1e-4, (
            f"block {i}: the edit has a component along the prior ({cos.abs().max():.1e})"
        )


def test_several_concepts_in_one_pass_equal_one_by_one():
    # One double block, so every run sees the same image stream; the deltas must simply add up.
    model = tiny_flux2(depth=1)
    inp, enc2 = inputs(model), encoded(model, n_concepts=2)
    c1, c2 = Concept("a", 3.0, tau_m=0.4), Concept("b", 2.0, tau_m=0.6)
    both = edit_probe.run_step(model, EditSpec(concepts=(c1, c2)), enc2, inp)[1]
    one = edit_probe.run_step(
        model, EditSpec(concepts=(c1,)), EncodedEdit(enc2.branch_txt[:2], None, enc2.positions[:1]), inp
    )[1]
    two = edit_probe.run_step(
        model,
        EditSpec(concepts=(c2,)),
        EncodedEdit(enc2.branch_txt[::2].clone(), None, enc2.positions[1:]),
        inp,
    )[1]
    base = both[0][1]
    torch.testing.assert_close(
        both[0][0] - base, (one[0][0] - base) + (two[0][0] - base), rtol=1e-5, atol=1e-5
    )
    assert (one[0][0] - base).abs().max() > 1e-3 and (two[0][0] - base).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- keyword masks


def tokenizer(specials, template, **names) -> PreTrainedTokenizerFast:
    bpe = train_byte_bpe(specials, [*BUILTIN_CORPUS, SYSTEM_MESSAGE])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, chat_template=template, **names)


@pytest.fixture(scope="module")
def klein_text():
    """A tiny Qwen3 text encoder, klein's chat, 3 layers of width 8 (= TINY_FLUX2's 24 text channels), 32 tokens."""
    tok = tokenizer(QWEN3_SPECIALS, QWEN3_TEMPLATE,
                    eos_token="<|im_end|>", pad_token="<|endoftext|>")  # fmt: skip
    torch.manual_seed(1)
    config = Qwen3Config(vocab_size=len(tok), hidden_size=8, intermediate_size=16, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=4, max_position_embeddings=64)  # fmt: skip
    llm = Qwen3ForCausalLM(config).model.float()
    return Flux2TextEncoder(
        llm, tok, dataclasses.replace(SPECS["klein"], output_layers=(1, 2, 3), max_length=32)
    )


def test_keyword_positions_are_every_sub_token_inside_the_chat(klein_text):
    tok = klein_text.tokenizer
    positions = klein_text.word_token_positions("a person with eyeglasses", "eyeglasses")
    ids = klein_text.tokenize(["a person with eyeglasses"])[0][0]
    assert len(positions) > 1, "the test needs a keyword split into pieces"
    assert positions == list(range(positions[0], positions[-1] + 1))
    assert tok.decode(ids[positions]).strip() == "eyeglasses"
    assert positions[0] > 3  # after the chat's opening tokens (<|im_start|>user ...)
    # dev's chat: the system message says "image" too; only the prompt's own occurrence counts.
    dev = Flux2TextEncoder(torch.nn.Identity(), tokenizer(
        MISTRAL_SPECIALS, MISTRAL_TEMPLATE, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"), SPECS["dev"])  # fmt: skip
    dev_ids = dev.tokenize(["an image of a cat"])[0][0]
    (image,) = [dev.word_token_positions("an image of a cat", "image")]
    assert dev.tokenizer.decode(dev_ids[image]).strip() == "image"
    assert image[0] > dev_ids.tolist().index(dev.tokenizer.convert_tokens_to_ids("[INST]"))
    with pytest.raises(ValueError, match="word 'hat' does not occur in the prompt 'a cat'"):
        dev.word_token_positions("a cat", "hat")


def test_mask_averages_every_keyword_sub_token(klein_text):
    model = tiny_flux2(depth=1)
    spec = EditSpec(concepts=(Concept("eyeglasses", 4.0, tau_m=0.5),))
    enc = encode_edit(spec, klein_text)
    positions = klein_text.word_token_positions("eyeglasses", "eyeglasses")
    assert enc.positions == [positions] and len(positions) > 1
    assert enc.branch_txt.shape == (2, 32, model.params.context_in_dim) and enc.coarse_pool is None
    inp = inputs(model, B=1)
    inp["txt"], inp["txt_ids"] = klein_text(["a portrait of a person"]), txt_ids(1, 32)

    class KeepQuery(edit_probe.Spy):
        def double_block(self, site):
            self.site_q = site.q.clone()
            return super().double_block(site)

    schedule = FluxSpaceSchedule(spec, enc, keep_masks=True)
    spy = KeepQuery(schedule.at_step(0, 1.0, 1))
    with torch.inference_mode():
        model(**inp, edit=spy)
        # The edit branch's text keys in block 0, by hand: txt_in, the shared text modulation, rope.
        blk = model.double_blocks[0]
        vec = model.conditioning(inp["timesteps"], inp["guidance"])
        mod1, _ = model.double_stream_modulation_txt(vec)
        s = model.txt_in(enc.branch_txt[1:2])
        _, k, v = blk.txt_attn.qkv_heads(mod1.modulate(blk.txt_norm1(s)))
        pe = model.pe_embedder(torch.cat((inp["txt_ids"], inp["img_ids"]), dim=1))
        _, k = apply_rope(k, k, pe[:, :, :32])
        img_q = spy.site_q[:, :, 32:]
        logits = torch.einsum("bhnd,bhtd->bhnt", img_q, k) / math.sqrt(img_q.shape[-1])
        every = logits.softmax(-1)[..., positions].mean(1).mean(-1)  # (1, N): all the keyword's pieces
        first = logits.softmax(-1)[..., positions[:1]].mean(1).mean(-1)  # one piece only
    ((_, block, (mask,)),) = schedule.masks.entries
    assert block == 0
    torch.testing.assert_close(keyword_attention(img_q, k, positions), every, rtol=1e-5, atol=1e-7)
    assert torch.equal(mask, concept_mask(every, 0.5))
    assert not torch.allclose(every, first)  # the pieces differ: averaging all of them matters


# ---------------------------------------------------------------------------------------------- the coarse edit


def test_coarse_edit_is_refused_before_any_work_with_one_message(model, klein_text):
    spec = EditSpec(concepts=(Concept("x", lambda_fine=2.0),), lambda_coarse=0.5)

    def refused(call):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == COARSE_REFUSAL

    refused(lambda: validate(spec, num_steps=4, num_double_blocks=model.params.depth, pooled_text=False))
    refused(lambda: encode_edit(spec, klein_text))
    refused(lambda: FluxSpaceSchedule(spec, encoded(model)))
    calls = []
    refused(lambda: sample(lambda *a, **k: calls.append(1), FluxSpaceSchedule(spec, encoded(model))))
    assert calls == []
    # A pooled vector from elsewhere (FLUX.1's encoder) gets as far as the model, which refuses it.
    with_pool = dataclasses.replace(encoded(model), coarse_pool=torch.zeros(1, 8))
    refused(lambda: model(**inputs(model), edit=FluxSpaceEdit(spec, with_pool)))
    validate(spec, num_steps=4, num_double_blocks=model.params.depth)  # FLUX.1 (pooled_text): allowed
    with pytest.raises(ValueError, match="reference mode reproduces the unofficial FLUX.1 code"):
        encode_edit(dataclasses.replace(spec, lambda_coarse=0.0, reference=True), klein_text)
