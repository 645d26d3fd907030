"""A tiny InternVL (transformers' own ``InternVLForConditionalGeneration``, model_type ``internvl``), offline.

Shaped like InternVL3-1B-hf at a toy size: an InternViT-style vision tower on 32 px tiles with 4 px patches
(8 x 8 patches), a pixel shuffle with ``downsample_ratio`` 0.5 into 4 x 4 = 16 image tokens per tile, the
LayerNorm + 2-layer GELU projector, and a Qwen2 language model (1-D RoPE, q/k/v biases, 4 query heads over 2
key/value heads, 2 blocks). The processor is a real ``InternVLProcessor``: a ``GotOcr2ImageProcessor`` with
32 px tiles and at most 6 tiles (plus the thumbnail), a word-level tokenizer with InternVL's special tokens
(``<img>``, ``</img>``, ``<IMG_CONTEXT>``, ``<video>``) and Qwen's chat markers (``<|im_start|>``,
``<|im_end|>`` = EOS), and InternVL-HF's ChatML template (the image as ``<IMG_CONTEXT>\\n`` before the text,
no system turn, ``<|im_start|>assistant\\n`` as the generation prompt). Model and processor round-trip
through ``save_pretrained`` / ``AutoModelForImageTextToText`` + ``AutoProcessor``.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    InternVLVisionConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from api_tool.demo.tiny_llava import vocabulary
from tests.tiny_lvlms import suppress_special_tokens
from tests.tiny_models import reward_feature_zero

TILE_SIZE = 32
PATCH_SIZE = 4
DOWNSAMPLE_RATIO = 0.5
TOKENS_PER_TILE = int(TILE_SIZE // PATCH_SIZE * DOWNSAMPLE_RATIO) ** 2
"""16: a 4 x 4 grid of image tokens per tile."""
MAX_TILES = 6

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
VIDEO_TOKEN = "<video>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT, VIDEO_TOKEN, UNK_TOKEN)

INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""The structure of InternVL-HF's chat template (ChatML; an image is one ``<IMG_CONTEXT>`` placeholder that the
processor expands to ``<img>`` + 256 * tiles ``<IMG_CONTEXT>`` + ``</img>``)."""


def build_tiny_internvl_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer (the tiny LLaVA's vocabulary) with InternVL's and ChatML's special tokens, no BOS."""
    tokens = [*SPECIAL_TOKENS, *vocabulary()]
    ids = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(ids, unk_token=UNK_TOKEN))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens={
            "context_image_token": IMG_CONTEXT,
            "start_image_token": IMG_START,
            "end_image_token": IMG_END,
            "video_token": VIDEO_TOKEN,
        },
    )


def build_tiny_internvl_processor(max_tiles: int = MAX_TILES) -> InternVLProcessor:
    """An ``InternVLProcessor`` with 32 px tiles (1..``max_tiles`` tiles + thumbnail) and 16 tokens per tile."""
    size = {"height": TILE_SIZE, "width": TILE_SIZE}
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, min_patches=1, max_patches=max_tiles),
        tokenizer=build_tiny_internvl_tokenizer(),
        video_processor=InternVLVideoProcessor(size=size),
        image_seq_length=TOKENS_PER_TILE,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )


def tiny_internvl_config(tokenizer: PreTrainedTokenizerFast, text_model: str = "qwen2") -> InternVLConfig:
    """InternVL3's wiring at toy size: last vision layer, CLS dropped, pixel shuffle 0.5, Qwen2 (or Qwen3) text."""
    vision = InternVLVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=TILE_SIZE,
        patch_size=PATCH_SIZE,
    )
    text_arguments = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "rope_theta": 10000.0,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if text_model == "qwen2":
        text = Qwen2Config(**text_arguments)
    elif text_model == "qwen3":
        from transformers import Qwen3Config

        text = Qwen3Config(head_dim=16, **text_arguments)
    else:
        raise ValueError(f"text_model must be 'qwen2' or 'qwen3', got {text_model!r}")
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT),
        image_seq_length=TOKENS_PER_TILE,
        downsample_ratio=DOWNSAMPLE_RATIO,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


def build_tiny_internvl(
    seed: int = 0, *, text_model: str = "qwen2", attn_implementation: str = "sdpa", max_tiles: int = MAX_TILES
) -> tuple[InternVLForConditionalGeneration, InternVLProcessor]:
    """A random-weight tiny ``InternVLForConditionalGeneration`` (eval, float32) and its processor.

    The same ``seed`` gives the same weights, whatever ``attn_implementation`` ("sdpa" or "eager").
    """
    processor = build_tiny_internvl_processor(max_tiles)
    tokenizer = processor.tokenizer
    config = tiny_internvl_config(tokenizer, text_model)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    suppress_special_tokens(model, processor.tokenizer)
    return model.to(torch.float32).eval(), processor


@torch.no_grad()
def sharpen_attention(model: InternVLForConditionalGeneration, factor: float = 8.0) -> None:
    """Scale every decoder block's queries and keys by ``factor`` (in place), so random-weight attention is far
    from uniform (the default 0.02-scale initialisation gives nearly flat attention): the q/k projections, or
    the q/k norms' weights where the block normalises them (Qwen3)."""
    for layer in model.model.language_model.layers:
        attention = layer.self_attn
        if getattr(attention, "q_norm", None) is not None:
            scaled = [attention.q_norm.weight, attention.k_norm.weight]
        else:
            scaled = [attention.q_proj.weight, attention.q_proj.bias, attention.k_proj.weight, attention.k_proj.bias]
        for parameter in scaled:
            if parameter is not None:
                parameter.mul_(factor)


@torch.no_grad()
def attend_to_bright_tokens(model: InternVLForConditionalGeneration) -> None:
    """Rewire ``model`` in place so that at decoder block 0 every text query attends to the image tokens of
    bright (white) image regions and ignores dark ones, through the real pixel path of every tile.

    * vision tower: the patch embedding puts a patch's mean normalised value minus 0.5 in channel 0 (the
      other channels, the CLS token and the position embeddings are zero) and the encoder layers add
      nothing (layer scales zero), so a white patch carries about +1.4 and a black one about -2.3;
    * pixel shuffle + projector: the LayerNorm over a token's 2 x 2 patches turns channel 0's sign into a
      fixed vector ``+u`` (all four bright) or ``-u`` (all dark); ``gelu(4 u . x)`` in text channel 0;
    * block 0's keys read text channel 0 and its queries read channel 1, which every token embedding sets
      to a large constant; both use the slowest rotary pair, so positions barely rotate them.
    """
    vision = model.model.vision_tower
    embeddings = vision.embeddings
    patch = embeddings.patch_embeddings.projection
    patch.weight.zero_()
    patch.bias.zero_()
    patch.weight[0] = 1.0 / (patch.weight.shape[1] * patch.weight.shape[2] * patch.weight.shape[3])
    embeddings.cls_token.zero_()
    embeddings.position_embeddings.zero_()
    embeddings.position_embeddings[:, :, 0] = -0.5
    for layer in vision.encoder.layer:
        layer.lambda_1.zero_()
        layer.lambda_2.zero_()
    projector = model.model.multi_modal_projector
    projector.layer_norm.weight.fill_(1.0)
    projector.layer_norm.bias.zero_()
    projector.linear_1.weight.zero_()
    projector.linear_1.bias.zero_()
    vision_hidden = model.config.vision_config.hidden_size
    for sub_patch in range(int(1 / model.config.downsample_ratio) ** 2):
        projector.linear_1.weight[0, sub_patch * vision_hidden] = 1.0
    projector.linear_2.weight.copy_(torch.eye(projector.linear_2.weight.shape[0]))
    projector.linear_2.bias.zero_()

    language_model = model.model.language_model
    language_model.embed_tokens.weight[:, 1] = 10.0
    block = language_model.layers[0]
    block.input_layernorm.weight.fill_(1.0)
    reward_feature_zero(block.self_attn)


def bright_rectangle_image(
    size: tuple[int, int], rectangle: tuple[int, int, int, int], background: tuple[int, int, int] = (0, 0, 0)
) -> Image.Image:
    """An RGB image of ``size = (width, height)``, dark, with a white ``rectangle = (x0, y0, x1, y1)`` (x1, y1
    exclusive)."""
    image = Image.new("RGB", size, background)
    ImageDraw.Draw(image).rectangle(
        (rectangle[0], rectangle[1], rectangle[2] - 1, rectangle[3] - 1), fill=(255, 255, 255)
    )
    return image
