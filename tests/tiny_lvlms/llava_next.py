"""Tiny random-weight LLaVA-NeXT and LLaVA-OneVision models with their processors, built offline.

* ``build_tiny_llava_next``: a CLIP tower (32 px crops, 8 px patches: 4 x 4 features per crop, read at the
  second-to-last layer with CLS dropped, as llava-v1.6) and a Llama (64 wide, 2 blocks, 4 heads over 2
  KV heads); grid pinpoints of 1 x 1 to 2 x 2 and 1 x 3 crops; the Mistral-style ``[INST] <image>\\n...
  [/INST]`` template of llava-hf/llava-v1.6-mistral-7b-hf.
* ``build_tiny_llava_onevision``: a SigLIP tower (36 px crops, 8 px patches: 4 x 4 features covering
  32 px of each crop, a gap at every crop seam as SigLIP-384/14 leaves 6 px; read ``full`` at the last
  layer) and a Qwen2 (q/k/v biases); pinpoints of 36 px crops; ``vision_aspect_ratio`` ``anyres_max_9``
  by default (pass ``anyres_max_1`` to make every multi-crop grid pooled); the ChatML template
  (``<|im_start|>user\\n<image>\\n...<|im_end|>\\n<|im_start|>assistant\\n``).

The tokenizer is the repo's word-level one (``api_tool.demo.tiny_llava``) with the families' special
tokens added. Models are float32, in eval mode, and round-trip through ``save_pretrained`` /
``AutoModelForImageTextToText.from_pretrained`` + ``AutoProcessor.from_pretrained``.
``plant_bright_attention`` rewires either model so that block 0's text queries attend to bright patches.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from api_tool.demo.tiny_llava import IMAGE_TOKEN, build_tiny_llava_processor
from tests.tiny_lvlms import suppress_special_tokens
from tests.tiny_models import reward_feature_zero

VIDEO_TOKEN = "<video>"
FAMILY_TOKENS = ("[INST]", "[/INST]", "<|im_start|>", "<|im_end|>", VIDEO_TOKEN)

NEXT_SIDE, NEXT_PATCH = 32, 8
NEXT_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
ONEVISION_SIDE, ONEVISION_PATCH = 36, 8
ONEVISION_PINPOINTS = [[36, 36], [36, 72], [72, 36], [72, 72], [36, 108], [108, 36]]

LLAVA_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + eos_token }}"
    "{% endif %}{% endfor %}"
)
"""llava-v1.6-mistral's template: ``[INST] <image>\\n{question} [/INST] {answer}</s>`` (no generation
prompt: the user turn ends the prompt)."""

LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""llava-onevision-qwen2's ChatML template: ``<|im_start|>user\\n<image>\\n{question}<|im_end|>\\n
<|im_start|>assistant\\n``."""


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The repo's tiny word-level tokenizer with ``[INST] [/INST] <|im_start|> <|im_end|> <video>`` added."""
    tokenizer = build_tiny_llava_processor().tokenizer
    tokenizer.add_tokens(list(FAMILY_TOKENS), special_tokens=True)
    return tokenizer


def _llama(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _qwen2(tokenizer: PreTrainedTokenizerFast, eos: int) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
    )


def _finish(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, eos: int) -> torch.nn.Module:
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    suppress_special_tokens(model, tokenizer)
    return model.float().eval()


def build_tiny_llava_next(
    seed: int = 0, *, attn_implementation: str = "sdpa"
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """A random-weight LLaVA-NeXT (CLIP 32/8 + Llama) and its processor (see the module docstring)."""
    tokenizer = build_tiny_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=NEXT_SIDE,
        patch_size=NEXT_PATCH,
        hidden_act="quick_gelu",
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=_llama(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=NEXT_PINPOINTS,
        image_seq_length=(NEXT_SIDE // NEXT_PATCH) ** 2,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration(config)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": NEXT_SIDE},
        crop_size={"height": NEXT_SIDE, "width": NEXT_SIDE},
        image_grid_pinpoints=NEXT_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=NEXT_PATCH,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_NEXT_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    return _finish(model, tokenizer, tokenizer.eos_token_id), processor  # type: ignore[return-value]


def build_tiny_llava_onevision(
    seed: int = 0, *, vision_aspect_ratio: str = "anyres_max_9", attn_implementation: str = "sdpa"
) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor]:
    """A random-weight LLaVA-OneVision (SigLIP 36/8 + Qwen2) and its processor (see the module docstring)."""
    tokenizer = build_tiny_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=ONEVISION_SIDE,
        patch_size=ONEVISION_PATCH,
        vision_use_head=False,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=_qwen2(tokenizer, eos),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=ONEVISION_PINPOINTS,
        vision_aspect_ratio=vision_aspect_ratio,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config)
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": ONEVISION_SIDE, "width": ONEVISION_SIDE},
        image_grid_pinpoints=ONEVISION_PINPOINTS,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(
            size={"height": ONEVISION_SIDE, "width": ONEVISION_SIDE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        ),
        num_image_tokens=(ONEVISION_SIDE // ONEVISION_PATCH) ** 2,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        video_token=VIDEO_TOKEN,
        vision_aspect_ratio=vision_aspect_ratio,
    )
    return _finish(model, tokenizer, eos), processor  # type: ignore[return-value]


@torch.no_grad()
def plant_bright_attention(model: torch.nn.Module) -> None:
    """Rewire ``model`` (either tiny family) in place so that at decoder block 0 every text query attends
    to the image tokens of bright patches and ignores dark ones (and the black canvas padding).

    Vision tower: the patch embedding puts a patch's mean normalised value in channel 0 (everything
    else, position embeddings included, zero) and the encoder layers add nothing. CLIP's pre-LayerNorm
    then turns the sign of (mean - 0.5) into ``+u`` / ``-u`` (as ``tests.tiny_models.attend_to_bright_patches``);
    SigLIP has no pre-norm, so channel 0 carries the mean itself (+1 white, -1 black). Projector:
    ``gelu(4 * channel 0)`` into text channel 0, identity after. ``image_newline`` is zero. Block 0:
    keys read text channel 0, queries read channel 1 (a large constant in every token embedding), both
    on the slowest rotary pair; bright image keys score about +16, dark ones about 0.
    """
    inner = model.model
    tower = inner.vision_tower
    vision = getattr(tower, "vision_model", tower)
    embeddings = vision.embeddings
    patch = embeddings.patch_embedding
    patch.weight.zero_()
    patch.weight[0] = 1.0 / (patch.weight.shape[1] * patch.weight.shape[2] * patch.weight.shape[3])
    if patch.bias is not None:
        patch.bias.zero_()
    embeddings.position_embedding.weight.zero_()
    if hasattr(embeddings, "class_embedding"):
        embeddings.position_embedding.weight[:, 0] = -0.5
        embeddings.class_embedding.zero_()
        vision.pre_layrnorm.weight.fill_(1.0)
        vision.pre_layrnorm.bias.zero_()
    for block in vision.encoder.layers:
        for linear in (block.self_attn.out_proj, block.mlp.fc2):
            linear.weight.zero_()
            linear.bias.zero_()
    projector = inner.multi_modal_projector
    projector.linear_1.weight.zero_()
    projector.linear_1.bias.zero_()
    projector.linear_1.weight[0, 0] = 4.0
    projector.linear_2.weight.copy_(torch.eye(projector.linear_2.weight.shape[0]))
    projector.linear_2.bias.zero_()
    inner.image_newline.zero_()

    language_model = inner.language_model
    language_model.embed_tokens.weight[:, 1] = 10.0
    block = language_model.layers[0]
    block.input_layernorm.weight.fill_(1.0)
    reward_feature_zero(block.self_attn)
