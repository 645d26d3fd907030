"""Tiny LLaVA-1.5-style models and their processor, built entirely offline.

A ``LlavaForConditionalGeneration`` made from configs (a small CLIP vision tower and a small Llama)
with random weights, and a ``LlavaProcessor`` whose every part is made here: a word-level tokenizer
built with the ``tokenizers`` package (no download), a locally configured ``CLIPImageProcessor`` and
the LLaVA-1.5 chat template (``USER: <image>\\n... ASSISTANT:``). Used by the tests, by the demo-model
training and by anything that needs a real LLaVA without a model hub. ``save_pretrained`` /
``from_pretrained`` round-trip through a local directory.

The tokenizer is word-level: lower-cased words and single punctuation marks, plus the special
tokens ``<pad> <unk> <s> </s> <image>``. Decoding joins words with spaces and re-attaches
punctuation, so decoding and re-encoding an answer gives back the same token ids (unknown words
become ``<unk>``). Pass ``vocab_texts`` to cover a training corpus.

Example:
    >>> from api_tool.demo.tiny_llava import build_tiny_llava, build_tiny_llava_processor
    >>> processor = build_tiny_llava_processor(["a red circle left of a blue square"])
    >>> model = build_tiny_llava(processor, hidden=64, layers=2, seed=0)
    >>> model.config.vision_config.image_size, processor.patch_size
    (64, 8)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN)

DEMO_LLAVA_DIR = Path(__file__).resolve().parent / "weights" / "llava"
"""Where the project's trained demo LLaVA lives (``LlavaAttributor(model="demo")``)."""

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\n' }}{% endif %}"
    "{% endfor %}"
    "{% for content in message['content'] %}{% if content['type'] == 'text' %}{{ content['text'] + ' ' }}"
    "{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
"""LLaVA-1.5's conversation format: ``USER: <image>\\n{question} ASSISTANT: {answer} </s>``.

Images come first in a user turn, then its text; an assistant turn ends with ``</s>`` (so training
on rendered conversations teaches the model to stop)."""

BASE_VOCABULARY = """
user assistant system image picture photo scene canvas
a an the this that these those it its there here is are was were be been being am do does did
what which who whom whose where when why how many much more most less least some any all none no
yes not and or but of in on at to from by with without for about into onto over under above below
between behind beside near far left right top bottom middle center centre corner side front back
up down upper lower next inside outside around across along than then so if because
i you he she we they me him her us them my your his our their
can could should would will shall may might must have has had
color colour colours colors shape shapes size sizes object objects thing things item items
count number answer question answers questions previous hint quality evaluate provide new
visible regions region unmasked masked related probably final correct incorrect wrong right true false
red green blue yellow purple orange pink white black gray grey brown cyan magenta
circle circles square squares triangle triangles star stars cross crosses ring rings
rectangle rectangles diamond diamonds heart hearts hexagon hexagons ellipse ellipses line lines
big small large tiny medium bright dark light background foreground texture gradient noise flat
one two three four five six seven eight nine ten zero
0 1 2 3 4 5 6 7 8 9 10
. , ? ! : ; ' " ( ) - /
"""
"""Words every tiny tokenizer knows: the conversation roles, the scene vocabulary (colours,
shapes, positions, counts), and the words of the reflection prompts."""


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])


def _pre_tokenizer(chat_tokens: bool = False) -> pre_tokenizers.PreTokenizer:
    if chat_tokens:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
                pre_tokenizers.Split(Regex(r"\n|[^\w\s]"), behavior="isolated"),
            ]
        )
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def vocabulary(texts: Iterable[str] = (), *, chat_tokens: bool = False) -> list[str]:
    """The word list of a tiny tokenizer: the base vocabulary plus every word of ``texts``, sorted.

    Words are what the tokenizer's own normaliser and pre-tokeniser make of the text (``chat_tokens``:
    see ``build_tiny_tokenizer``).

    Example:
        >>> "zebra" in vocabulary(["A Zebra!"]), "!" in vocabulary()
        (True, True)
    """
    normalizer, pre_tokenizer = _normalizer(), _pre_tokenizer(chat_tokens)
    words: set[str] = set()
    for text in (BASE_VOCABULARY, *texts):
        pieces = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
        words.update(piece for piece, _ in pieces)
    return sorted(words - set(SPECIAL_TOKENS))


def build_tiny_tokenizer(
    vocab_texts: Iterable[str] | None = None, *, chat_tokens: bool = False
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer with ``<pad> <unk> <s> </s> <image>`` (ids 0..4), adding ``<s>``.

    ``chat_tokens``: a newline is a token of its own and words keep their underscores, so a reply can
    hold a ``FINAL: ...`` line and a JSON tool call naming ``attention_prompt`` (what an assistant
    needs); by default newlines are dropped and every punctuation mark, ``_`` included, splits words.

    Example:
        >>> tokenizer = build_tiny_tokenizer(["call attention_prompt"], chat_tokens=True)
        >>> tokenizer.decode(tokenizer("Call attention_prompt.\nFINAL: yes").input_ids, skip_special_tokens=True)
        'call attention_prompt. \n final : yes'
    """
    tokens = [*SPECIAL_TOKENS, *vocabulary(vocab_texts or (), chat_tokens=chat_tokens)]
    ids = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(ids, unk_token=UNK_TOKEN))
    backend.normalizer = _normalizer()
    backend.pre_tokenizer = _pre_tokenizer(chat_tokens)
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, ids[BOS_TOKEN])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def build_tiny_llava_processor(
    vocab_texts: Iterable[str] | None = None,
    *,
    image_size: int = 64,
    patch_size: int = 8,
    pad_to_square: bool = False,
    chat_tokens: bool = False,
) -> LlavaProcessor:
    """A ``LlavaProcessor`` made offline: tiny tokenizer, CLIP image processor, LLaVA-1.5 template.

    The image processor resizes the short side to ``image_size`` and centre-crops a square of that
    side (LLaVA-1.5's CLIP preprocessing); with ``pad_to_square`` it first pads the image to a square
    with the mean colour (``LlavaImageProcessor``'s ``do_pad``, the original LLaVA-1.5 "pad" aspect
    mode), so nothing is cut off. One ``<image>`` in the text expands to one token per patch.
    ``chat_tokens`` goes to ``build_tiny_tokenizer``.

    Example:
        >>> processor = build_tiny_llava_processor(image_size=32, patch_size=8)
        >>> chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
        >>> processor.apply_chat_template(chat, add_generation_prompt=True)
        'USER: <image>\\nWhat? ASSISTANT:'
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    sizes = {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}}
    image_processor = LlavaImageProcessor(do_pad=True, **sizes) if pad_to_square else CLIPImageProcessor(**sizes)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tiny_tokenizer(vocab_texts, chat_tokens=chat_tokens),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def llava_15_config(
    tokenizer: Any,
    *,
    image_size: int,
    patch_size: int,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vision_hidden: int,
    vision_intermediate: int,
    vision_layers: int,
    vision_heads: int,
    max_positions: int,
    rms_norm_eps: float = 1e-6,
) -> LlavaConfig:
    """LLaVA-1.5's wiring at any size: a CLIP ViT (quick-GELU) read at its second-to-last layer with the
    CLS token dropped, a 2-layer GELU projector, and a Llama with ``heads`` query heads over ``kv_heads``
    key/value heads; vocabulary and special ids from ``tokenizer`` (which must hold ``IMAGE_TOKEN``).

    Example:
        >>> processor = build_tiny_llava_processor(image_size=32, patch_size=8)
        >>> config = llava_15_config(processor.tokenizer, image_size=32, patch_size=8, hidden=64, intermediate=128,
        ...     layers=2, heads=4, kv_heads=2, vision_hidden=32, vision_intermediate=128, vision_layers=2,
        ...     vision_heads=2, max_positions=512)
        >>> config.image_seq_length
        16
    """
    special = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vision_config = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act="quick_gelu",
    )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=rms_norm_eps,
        **special,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(image_size // patch_size) ** 2,
    )
    for name, value in special.items():
        setattr(config, name, value)
    return config


def build_tiny_llava(
    processor: LlavaProcessor,
    *,
    image_size: int | None = None,
    patch_size: int | None = None,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    max_positions: int = 1024,
    seed: int = 0,
) -> LlavaForConditionalGeneration:
    """A random-weight ``LlavaForConditionalGeneration`` matching ``processor``, in eval mode (fp32).

    The vision tower is a CLIP ViT (``image_size`` / ``patch_size`` default to the processor's), the
    language model a Llama with grouped-query attention (``heads`` query heads over ``kv_heads``
    key/value heads). LLaVA-1.5's wiring: second-to-last vision layer, CLS dropped, 2-layer GELU
    projector. The same ``seed`` gives the same weights.

    Example:
        >>> model = build_tiny_llava(build_tiny_llava_processor(), layers=3)
        >>> len(model.model.language_model.layers)
        3
    """
    config = llava_15_config(
        processor.tokenizer,
        image_size=image_size or int(processor.image_processor.crop_size["height"]),
        patch_size=patch_size or int(processor.patch_size),
        hidden=hidden,
        intermediate=2 * hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        vision_hidden=vision_hidden,
        vision_intermediate=4 * vision_hidden,
        vision_layers=vision_layers,
        vision_heads=vision_heads,
        max_positions=max_positions,
    )
    tokenizer = processor.tokenizer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval()


def save_tiny_llava(model: LlavaForConditionalGeneration, processor: LlavaProcessor, directory: str | Path) -> Path:
    """Write model (safetensors) and processor to ``directory``; loadable by ``load_tiny_llava``.

    Example:
        >>> path = save_tiny_llava(model, processor, "out/tiny-llava")  # doctest: +SKIP
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def load_tiny_llava(directory: str | Path) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Model (eval mode) and processor from a directory written by ``save_tiny_llava``; offline.

    Example:
        >>> model, processor = load_tiny_llava("out/tiny-llava")  # doctest: +SKIP
    """
    path = Path(directory)
    model = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return model.eval(), processor
