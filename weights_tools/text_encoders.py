"""Write small text-encoder folders in the layout of the official FLUX.1 and FLUX.2 repositories.

    folder/text_encoder/    CLIPTextModel (config.json, model.safetensors)   the CLIP-L slot
    folder/text_encoder_2/  T5EncoderModel (config.json, model.safetensors)  the T5-XXL slot
    folder/tokenizer/       CLIP tokenizer (vocab.json, merges.txt, tokenizer.json, ...)
    folder/tokenizer_2/     T5 tokenizer (spiece.model, tokenizer.json, ...)

`flux_core.conditioner.load_text_encoders` loads these exactly as it loads black-forest-labs/FLUX.1-dev.
FLUX.2 [klein] (`write_random_qwen3`, for tiny FLUX.2 presets):

    folder/text_encoder/    Qwen3ForCausalLM (config.json, model.safetensors), tiny and random
    folder/tokenizer/       a byte-level BPE with Qwen3's chat tokens and a chat template of Qwen3's form

`flux_core.flux2.conditioner.load_text_encoder(folder, "klein")` loads it as it loads FLUX.2-klein-4B's.
FLUX.2 [dev] (`write_random_mistral3`): the same two folders with a tiny random
Mistral3ForConditionalGeneration (the official class: a Mistral text model and a Pixtral vision
tower, unused for text) and Mistral's instruction tokens ([INST], [SYSTEM_PROMPT], [IMG]).
Tests use `write_random_text_encoders` (seeded random weights, tiny widths); a small trained model
reuses the two tokenizer trainers on its own caption corpus.

Every writer builds its folder in a temporary sibling and renames it into place at the end
(flux_core.atomic.atomic_folder), so a failure never leaves a half-written folder, and refuses to
replace a non-empty folder unless overwrite=True. `install_text_encoders` puts the four folders
into a folder that holds other files too (a checkpoint set), the same way.
"""

import io
import json
import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import sentencepiece as spm
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)
from transformers.utils import logging as hf_logging

from flux_core.atomic import atomic_folder, make_readable, replace_folder
from flux_core.conditioner import TEXT_ENCODER_FOLDERS

CLIP_MAX_LENGTH = 77  # CLIP-L position table (openai/clip-vit-large-patch14 config)
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"  # CLIP's BPE marks the last symbol of every word with this suffix

# A small English caption corpus (faces, people, objects, colours, places, styles): without a corpus
# of its own, a random folder still tokenises test prompts into sensible words and sub-words.
BUILTIN_CORPUS: tuple[str, ...] = (
    "a photo of a smiling woman with long brown hair and green eyes",
    "a portrait of an old man with a grey beard and round glasses",
    "a close-up portrait of a young girl with freckles and curly red hair",
    "a laughing child with blue eyes wearing a yellow raincoat",
    "a serious businessman in a dark suit and a striped tie",
    "an elderly woman with white hair and deep wrinkles, soft window light",
    "a man with a shaved head, a thick mustache and a warm smile",
    "a woman wearing sunglasses and a straw hat on a sunny beach",
    "a teenager with braces, short black hair and a hoodie",
    "a bearded sailor with a pipe and a knitted wool cap",
    "a surprised face with raised eyebrows and an open mouth",
    "an angry man frowning, with narrowed eyes and clenched teeth",
    "a sad woman with tears on her cheeks, looking down",
    "a calm face with closed eyes and a gentle expression",
    "a happy couple smiling at the camera in a park",
    "a baby with chubby cheeks sleeping in a cot",
    "a young man with glasses reading a book in a library",
    "a girl with pigtails and a missing front tooth grinning",
    "a chef with a white hat holding a wooden spoon",
    "a doctor in a white coat with a stethoscope",
    "a firefighter wearing a helmet covered in soot",
    "an astronaut floating inside a space station",
    "a knight in shining armour holding a sword and a shield",
    "a wizard with a long white beard and a pointed hat",
    "a dancer in a red dress spinning on a wooden stage",
    "a musician playing the violin under a streetlamp at night",
    "a red sports car parked on a wet city street at night",
    "a vintage blue bicycle leaning against a brick wall",
    "a white sailboat on a calm turquoise sea at sunset",
    "a steam train crossing a stone bridge in the mountains",
    "a yellow taxi waiting at a busy crossroads in the rain",
    "a wooden table with a cup of coffee and a croissant",
    "a bowl of fresh fruit: apples, oranges, bananas and grapes",
    "a glass vase full of purple tulips on a windowsill",
    "a leather armchair next to a crackling fireplace",
    "an old typewriter on a desk covered with papers",
    "a silver watch with a black leather strap",
    "a pair of running shoes on a gravel path",
    "a ceramic teapot with a blue floral pattern",
    "a stack of colourful books on a shelf",
    "a lighthouse on a rocky cliff during a storm",
    "a small cottage with a thatched roof and a flower garden",
    "a snowy forest of pine trees under a pale winter sky",
    "a desert with orange sand dunes and a single cactus",
    "a tropical island with palm trees and white sand",
    "a misty lake surrounded by autumn trees in gold and crimson",
    "a crowded market with stalls of spices and fabrics",
    "a futuristic city skyline with glowing neon signs",
    "a quiet village street with cobblestones and lanterns",
    "a waterfall in a green jungle with ferns and moss",
    "a black cat sitting on a windowsill in the moonlight",
    "a golden retriever puppy playing with a tennis ball",
    "a horse galloping across a field of tall grass",
    "a red fox curled up asleep in the snow",
    "an owl perched on a branch with big orange eyes",
    "a colourful parrot with green, red and blue feathers",
    "a fluffy white rabbit eating a carrot",
    "a herd of elephants walking across the savanna",
    "a goldfish swimming in a round glass bowl",
    "a butterfly with orange and black wings on a daisy",
    "an oil painting in the style of the impressionists",
    "a watercolour illustration with soft pastel colours",
    "a pencil sketch with detailed cross-hatching",
    "a digital painting, concept art, dramatic lighting",
    "a black and white photograph with strong contrast",
    "a cinematic still, shallow depth of field, bokeh",
    "a cartoon drawing with bold outlines and flat colours",
    "a pixel art sprite of a tiny hero with a sword",
    "a low poly render of a mountain landscape",
    "an anime style portrait with large shining eyes",
    "a renaissance portrait with a dark background",
    "a pop art poster in bright magenta, cyan and yellow",
    "a studio photo, soft lighting, sharp focus, highly detailed",
    "a vintage film photo with warm tones and grain",
    "a surreal scene of floating islands among pink clouds",
    "a minimalist poster with a single geometric shape",
    "a marble statue of a goddess in a museum hall",
    "a stained glass window with red, blue and amber light",
    "a mosaic of tiny tiles forming a turquoise peacock",
    "an embroidered pattern of roses on linen",
    "colours: red, orange, yellow, green, blue, indigo, violet",
    "shades: crimson, scarlet, amber, ochre, olive, teal, navy, lavender",
    "tones: black, white, grey, silver, gold, bronze, beige, brown",
    "she is smiling, laughing, crying, frowning, winking and yawning",
    "he looks young, old, tired, excited, worried, proud and shy",
    "a face with a beard, a mustache, freckles, dimples and a scar",
    "accessories: glasses, sunglasses, earrings, a necklace, a scarf and a hat",
    "a woman with a ponytail, a man with a bun, a child with bangs",
    "blonde hair, brunette hair, ginger hair, silver hair, dyed pink hair",
    "wearing a jacket, a sweater, a shirt, a dress, a coat and boots",
    "the morning sun, the evening glow, the midnight moon, the starry sky",
    "a cup, a plate, a fork, a knife, a spoon and a napkin",
    "a lamp, a chair, a sofa, a mirror, a clock and a rug",
    "an apple, a lemon, a cherry, a peach, a pear and a strawberry",
    "a mountain, a river, a valley, a meadow, a canyon and a glacier",
    "highly detailed, ultra realistic, photorealistic, award winning photograph",
    "trending on artstation, octane render, volumetric light, 8k",
    "A Photo Of A Woman. A Portrait Of A Man. The Cat, The Dog And The Bird.",
    "Letters A B C D E F G H I J K L M N O P Q R S T U V W X Y Z and digits 0 1 2 3 4 5 6 7 8 9.",
    "Punctuation: commas, full stops. Questions? Exclamations! (Brackets) 'quotes' \"double\" - dashes; colons: & more.",
)


# ---------------------------------------------------------------------------------------------------
# Corpus


def _check_corpus(corpus: Sequence[str]) -> list[str]:
    if isinstance(corpus, str) or not all(isinstance(text, str) for text in corpus):
        raise TypeError("corpus must be a list of strings (one caption or sentence each)")
    texts = [text for text in corpus if text.strip()]
    if not texts:
        raise ValueError("corpus is empty: pass at least one non-blank text")
    return texts


# ---------------------------------------------------------------------------------------------------
# Tokenizers


def train_t5_tokenizer(
    corpus: Sequence[str],
    folder: str | os.PathLike,
    vocab_size: int = 1000,
    extra_ids: int = 100,
    model_max_length: int = 512,
    overwrite: bool = False,
) -> T5Tokenizer:
    """Train a sentencepiece unigram model on `corpus` and save it as a T5 tokenizer in `folder`.

    T5's conventions (google/t5-v1_1-xxl, FLUX.1 `tokenizer_2/`): <pad> 0, </s> 1, <unk> 2, no <s>,
    NFKC normalisation, "▁" marks a word start; `extra_ids` sentinels <extra_id_N> follow the
    vocabulary. `vocab_size` is an upper bound: a small corpus yields fewer pieces. The folder holds
    spiece.model (as the official one does) and the tokenizer.json transformers writes.
    """
    texts = _check_corpus(corpus)
    folder = Path(folder)
    with atomic_folder(folder, overwrite) as tmp:
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            model_type="unigram",
            vocab_size=vocab_size,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            hard_vocab_limit=False,  # a small corpus cannot fill a large vocabulary
            character_coverage=1.0,  # keep every character seen: a small corpus has no rare-character noise
            num_threads=1,  # one thread: the same corpus gives the same file
            minloglevel=2,
        )
        (tmp / "spiece.model").write_bytes(model.getvalue())
        tokenizer = T5Tokenizer.from_pretrained(
            tmp, extra_ids=extra_ids, model_max_length=model_max_length, local_files_only=True
        )
        tokenizer.save_pretrained(tmp)
    return T5Tokenizer.from_pretrained(folder, local_files_only=True)


def _learn_bpe_merges(word_counts: dict[tuple[str, ...], int], num_merges: int) -> list[tuple[str, str]]:
    """Byte-pair encoding (Sennrich et al. 2016): merge the most frequent adjacent pair, repeatedly.

    Ties go to the alphabetically first pair, so the merges depend on the corpus only. (The BpeTrainer
    of `tokenizers` breaks ties in hash-map order: two runs on one corpus gave different merges.)
    """
    words = [list(symbols) for symbols in word_counts]
    counts = list(word_counts.values())
    pairs: Counter[tuple[str, str]] = Counter()
    where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)  # pair -> words that contain it
    for i, symbols in enumerate(words):
        for pair in pairwise(symbols):
            pairs[pair] += counts[i]
            where[pair].add(i)

    merges = []
    while pairs and len(merges) < num_merges:
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for i in sorted(where.pop(best)):
            symbols = words[i]
            for pair in pairwise(symbols):  # forget this word's pairs, then count them again
                pairs[pair] -= counts[i]
            j = 0
            while j < len(symbols) - 1:
                if (symbols[j], symbols[j + 1]) == best:
                    symbols[j : j + 2] = [symbols[j] + symbols[j + 1]]
                j += 1
            for pair in pairwise(symbols):
                pairs[pair] += counts[i]
                where[pair].add(i)
        pairs = +pairs  # drop pairs whose count fell to zero
    return merges


def train_clip_tokenizer(
    corpus: Sequence[str], folder: str | os.PathLike, vocab_size: int = 1024, overwrite: bool = False
) -> CLIPTokenizer:
    """Learn a byte-level BPE on `corpus` in CLIP's conventions and save a CLIP tokenizer in `folder`.

    Conventions of openai/clip-vit-large-patch14 (FLUX.1 `tokenizer/`): lower-cased text split by
    CLIP's regex, bytes shown as printable characters (GPT-2 byte level), `</w>` on the last symbol of
    each word; the vocabulary is the 256 byte symbols, the same with `</w>`, one token per merge, then
    <|startoftext|> and <|endoftext|> last (ids 49406, 49407 in CLIP-L). <|endoftext|> also pads.
    `vocab_size` is an upper bound (at least 514). The normaliser and pre-tokeniser are taken from
    transformers' CLIPTokenizer, so training splits text exactly as encoding will.
    """
    texts = _check_corpus(corpus)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    base = alphabet + [symbol + END_OF_WORD for symbol in alphabet]
    if vocab_size < len(base) + 2:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: CLIP's byte-level BPE needs at least {len(base) + 2}"
        )

    splitter = CLIPTokenizer().backend_tokenizer  # empty vocabulary; only its text pipeline is used
    word_counts: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        for word, _ in splitter.pre_tokenizer.pre_tokenize_str(splitter.normalizer.normalize_str(text)):
            word_counts[(*word[:-1], word[-1] + END_OF_WORD)] += 1
    merges = _learn_bpe_merges(dict(sorted(word_counts.items())), vocab_size - len(base) - 2)

    tokens = list(base)
    for a, b in merges:
        if a + b not in tokens:  # ("a", "bc") and ("ab", "c") both make "abc"
            tokens.append(a + b)
    vocab = {token: i for i, token in enumerate([*tokens, CLIP_BOS, CLIP_EOS])}

    folder = Path(folder)
    with atomic_folder(folder, overwrite) as tmp:
        # vocab.json + merges.txt are what the official folder holds (and what older transformers read).
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
        merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
        (tmp / "merges.txt").write_text(merges_txt, encoding="utf-8")
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)
        tokenizer.save_pretrained(tmp)
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


# ---------------------------------------------------------------------------------------------------
# Random text encoders


def write_random_text_encoders(
    folder: str | os.PathLike,
    t5_dim: int,
    clip_dim: int,
    t5_max_length: int = 512,
    seed: int = 0,
    corpus: Sequence[str] | None = None,
    num_layers: int = 2,
    num_heads: int = 2,
    t5_vocab_size: int = 1000,
    clip_vocab_size: int = 1024,
    overwrite: bool = False,
) -> Path:
    """Write a text-encoder folder with seeded random weights; same arguments -> identical files.

    t5_dim is the width of `txt` (a Flux model's context_in_dim), clip_dim the width of `vec` (its
    vec_in_dim). Shapes keep the ratios of the real encoders: T5 v1.1 (gated-GELU, d_kv = d_model /
    heads, d_ff = 2.5 d_model) and CLIP-L text (quick-GELU, MLP 4x, 77 positions).
    t5_max_length is saved as the T5 tokenizer's model_max_length (512 in FLUX.1-dev).
    """
    for name, dim in (("t5_dim", t5_dim), ("clip_dim", clip_dim)):
        if dim % num_heads:
            raise ValueError(f"{name} {dim} is not divisible by num_heads {num_heads}")
    texts = BUILTIN_CORPUS if corpus is None else corpus
    folder = Path(folder)
    with atomic_folder(folder, overwrite) as tmp:
        t5_tokenizer = train_t5_tokenizer(
            texts, tmp / "tokenizer_2", t5_vocab_size, model_max_length=t5_max_length
        )
        clip_tokenizer = train_clip_tokenizer(texts, tmp / "tokenizer", clip_vocab_size)

        t5_config = T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=t5_dim,
            d_kv=t5_dim // num_heads,
            d_ff=5 * t5_dim // 2,
            num_layers=num_layers,
            num_heads=num_heads,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
            decoder_start_token_id=t5_tokenizer.pad_token_id,
        )
        clip_config = CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=clip_dim,
            intermediate_size=4 * clip_dim,
            projection_dim=clip_dim,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            max_position_embeddings=CLIP_MAX_LENGTH,
            hidden_act="quick_gelu",
            # pooler_output is read at the first token equal to eos_token_id: give it the real one.
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
        with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
            torch.manual_seed(seed)
            t5 = T5EncoderModel(t5_config)
            clip = CLIPTextModel(clip_config)
        t5.save_pretrained(tmp / "text_encoder_2")
        clip.save_pretrained(tmp / "text_encoder")
    return folder


def install_folders(out: str | os.PathLike, names: Sequence[str], build, overwrite: bool = False) -> Path:
    """Folders `names`, written by build(folder) into a temporary folder inside `out`, moved into `out`
    beside whatever else it holds; existing ones are replaced only with overwrite=True."""
    out = Path(out)
    taken = [name for name in names if (out / name).exists()]
    if taken and not overwrite:
        raise FileExistsError(f"{out} already has {', '.join(taken)}; pass overwrite=True to replace them")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".text-encoders.", dir=out) as tmp:
        built = build(Path(tmp) / "te")
        for name in names:
            make_readable(built / name)
            replace_folder(built / name, out / name)
    return out


def install_text_encoders(out: str | os.PathLike, overwrite: bool = False, **kwargs) -> Path:
    """The four folders of random text encoders (`write_random_text_encoders`' arguments) put into
    `out`, beside whatever else it holds (a checkpoint's transformer and AE).

    All four are built in a temporary folder inside `out` and only then moved in, so a failure while
    building leaves `out` as it was. Existing ones are replaced only with overwrite=True. They get
    ordinary modes (temporary folders are private), so others can read them like the files beside them.
    """
    return install_folders(
        out, TEXT_ENCODER_FOLDERS, lambda f: write_random_text_encoders(f, **kwargs), overwrite
    )


# ---------------------------------------------------------------------------------------------------
# FLUX.2: a tiny random Qwen3 ([klein]) or Mistral3 ([dev])

# Qwen3's chat tokens and a template of the form of Qwen3's (user turn; the assistant turn opened with
# an empty think block when enable_thinking is false), enough for Flux2TextEncoder's chat.
QWEN3_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def train_byte_bpe(
    specials: Sequence[str], corpus: Sequence[str] = BUILTIN_CORPUS, vocab_size: int = 400
) -> Tokenizer:
    """A byte-level BPE (the kind Qwen3 and Mistral use) trained on `corpus`, with `specials` first."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # show_progress=False: the trainer's progress lines go straight to the process's stdout (blank lines off a TTY)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    tok.train_from_iterator(list(corpus), trainer)
    return tok


# Mistral's instruction tokens and a chat template of the form of Mistral-Small-3.x's (system prompt,
# user turn; the content as a list of typed parts, as the official format_input writes it).
MISTRAL_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ m['content'][0]['text'] }}"
    "[/SYSTEM_PROMPT]{% elif m['role'] == 'user' %}[INST]{{ m['content'][0]['text'] }}[/INST]{% endif %}{% endfor %}"
)


def tiny_llm_config(config_class, vocab: int, hidden: int, layers: int, **extra):
    """A tiny decoder config: 2 heads of hidden / 2 (1 key-value head), MLP 2 x hidden, 1024 positions."""
    return config_class(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
                        max_position_embeddings=1024, **extra)  # fmt: skip


def _write_llm(folder: Path, tok, build, seed: int, overwrite: bool) -> Path:
    """tokenizer/ and text_encoder/ (the model `build()` makes, seeded) into `folder`, atomically."""
    with atomic_folder(folder, overwrite) as tmp:
        tok.save_pretrained(tmp / "tokenizer")
        with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
            torch.manual_seed(seed)
            model = build()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a writer says what it wrote, once (flux-weights random)
        try:
            model.save_pretrained(tmp / "text_encoder")
        finally:
            if bars:
                hf_logging.enable_progress_bar()
    return folder


def write_random_qwen3(folder: str | os.PathLike, hidden: int, layers: int, seed: int = 0,
                       overwrite: bool = False) -> Path:  # fmt: skip
    """A FLUX.2 [klein] text-encoder folder (text_encoder/, tokenizer/) with a seeded random Qwen3 of
    `layers` layers of width `hidden`; same arguments -> identical files. A FLUX.2 transformer reading
    layers (a, b, c) takes 3 x hidden features a token and needs layers >= c."""
    tok = PreTrainedTokenizerFast(tokenizer_object=train_byte_bpe(QWEN3_SPECIALS), eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", chat_template=QWEN3_TEMPLATE)  # fmt: skip
    config = tiny_llm_config(Qwen3Config, len(tok), hidden, layers)
    return _write_llm(Path(folder), tok, lambda: Qwen3ForCausalLM(config), seed, overwrite)


def write_random_mistral3(folder: str | os.PathLike, hidden: int, layers: int, seed: int = 0,
                          overwrite: bool = False) -> Path:  # fmt: skip
    """A FLUX.2 [dev] text-encoder folder (text_encoder/, tokenizer/) with a seeded random
    Mistral3ForConditionalGeneration whose text model has `layers` layers of width `hidden` (and a
    one-layer Pixtral vision tower the text path never runs); same arguments -> identical files."""
    from flux_core.flux2.conditioner import SYSTEM_MESSAGE

    tok = PreTrainedTokenizerFast(tokenizer_object=train_byte_bpe(MISTRAL_SPECIALS, [*BUILTIN_CORPUS, SYSTEM_MESSAGE]),
                                  bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                  chat_template=MISTRAL_TEMPLATE)  # fmt: skip
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=32, patch_size=4, head_dim=8)  # fmt: skip
    config = Mistral3Config(text_config=tiny_llm_config(MistralConfig, len(tok), hidden, layers),
                            vision_config=vision, image_token_index=tok.convert_tokens_to_ids("[IMG]"))  # fmt: skip
    return _write_llm(Path(folder), tok, lambda: Mistral3ForConditionalGeneration(config), seed, overwrite)
