"""A tiny Gemma 3 (``Gemma3ForConditionalGeneration``) and its processor, built offline with random weights.

Shaped like the real model where the attribution depends on it:

* SigLIP vision tower on a 32 x 32 input with 4-pixel patches (an 8 x 8 patch grid), average-pooled by the
  projector to ``mm_tokens_per_image = 16`` image tokens (4 x 4), as Gemma 3 pools 64 x 64 patches to 16 x 16;
* a Gemma 3 text model with two blocks, a sliding-window one (local RoPE base 10 000) and a global one (RoPE
  base 1 000 000 with linear scaling, factor 8, like Gemma-3-4B), grouped-query attention (4 query heads over 2
  key/value heads), ``head_dim = 16`` but ``query_pre_attn_scalar = 24`` (so the score scale is not
  ``head_dim ** -0.5``), and random q/k RMSNorm weights (the default zero init would make them the identity);
* a word-level tokenizer (``api_tool.demo.tiny_llava.vocabulary``) with Gemma's special tokens at Gemma's ids
  (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3) plus ``<start_of_turn> <end_of_turn> <start_of_image>
  <end_of_image> <image_soft_token>``, and a chat template with the real one's structure
  (``<bos><start_of_turn>user\\n<start_of_image>question<end_of_turn>\\n<start_of_turn>model\\n``).

The processor expands ``<start_of_image>`` into ``\\n\\n<start_of_image>`` + 16 x ``<image_soft_token>`` +
``<end_of_image>\\n\\n`` and returns ``token_type_ids`` (1 on the image soft tokens).

Example:
    >>> model, processor = build_tiny_gemma3()
    >>> model.config.mm_tokens_per_image, processor.image_seq_length
    (16, 16)
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)

from api_tool.demo.tiny_llava import vocabulary
from tests.tiny_lvlms import suppress_special_tokens
from tests.tiny_models import reward_feature_zero

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
BOI, EOI, IMAGE_SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN, BOI, EOI, IMAGE_SOFT)

IMAGE_SIZE = 32
PATCH_SIZE = 4
TOKENS_PER_SIDE = 4
SLIDING_WINDOW = 512
LAYER_TYPES: tuple[str, ...] = ("sliding_attention", "full_attention")

GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
"""Gemma 3's chat template, reduced: ``<bos>``, turns ``<start_of_turn>{user|model}\\n...<end_of_turn>\\n``,
a system message folded into the first user turn, ``<start_of_image>`` for each image item, texts trimmed."""


def build_gemma3_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer with Gemma 3's special tokens, adding ``<bos>`` in front.

    Example:
        >>> tokenizer = build_gemma3_tokenizer()
        >>> tokenizer.convert_ids_to_tokens([0, 1, 2, 3])
        ['<pad>', '<eos>', '<bos>', '<unk>']
    """
    tokens = [*SPECIAL_TOKENS, *vocabulary(["model"])]
    ids = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(ids, unk_token=UNK))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, ids[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"boi_token": BOI, "eoi_token": EOI, "image_token": IMAGE_SOFT},
    )


def build_tiny_gemma3_processor() -> Gemma3Processor:
    """A ``Gemma3Processor``: the tokenizer above, a 32 x 32 ``Gemma3ImageProcessor`` (mean = std = 0.5, as
    Gemma 3's), 16 image tokens per image, the chat template above."""
    image_processor = Gemma3ImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pan_and_scan=False,
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=build_gemma3_tokenizer(),
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=TOKENS_PER_SIDE**2,
    )


def tiny_gemma3_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    sliding_window: int = SLIDING_WINDOW,
    layer_types: tuple[str, ...] = LAYER_TYPES,
    attn_logit_softcapping: float | None = None,
) -> Gemma3Config:
    """The tiny model's config (see the module docstring)."""
    vision_config = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        vision_use_head=False,
    )
    text_config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=len(layer_types),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=sliding_window,
        layer_types=list(layer_types),
        max_position_embeddings=1024,
        attn_logit_softcapping=attn_logit_softcapping,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        },
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Gemma3Config(
        vision_config=vision_config,
        text_config=text_config,
        mm_tokens_per_image=TOKENS_PER_SIDE**2,
        boi_token_index=tokenizer.convert_tokens_to_ids(BOI),
        eoi_token_index=tokenizer.convert_tokens_to_ids(EOI),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_SOFT),
    )


@torch.no_grad()
def build_tiny_gemma3(
    seed: int = 0,
    *,
    sliding_window: int = SLIDING_WINDOW,
    layer_types: tuple[str, ...] = LAYER_TYPES,
    attn_logit_softcapping: float | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[Gemma3ForConditionalGeneration, Gemma3Processor]:
    """A random-weight ``Gemma3ForConditionalGeneration`` (eval, float32) and its processor.

    Gemma initialises every RMSNorm weight and the image projection to zero; here they are random (the
    norms' scale ``1 + w`` around 1, the projection so image tokens differ), so q/k norms and image
    features take part. The same ``seed`` gives the same weights.
    """
    processor = build_tiny_gemma3_processor()
    tokenizer = processor.tokenizer
    config = tiny_gemma3_config(
        tokenizer, sliding_window=sliding_window, layer_types=layer_types, attn_logit_softcapping=attn_logit_softcapping
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma3ForConditionalGeneration(config)
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight") and "vision_tower" not in name:
                parameter.copy_(0.5 * torch.randn_like(parameter))
        projector = model.model.multi_modal_projector
        projector.mm_input_projection_weight.copy_(0.3 * torch.randn_like(projector.mm_input_projection_weight))
    model.set_attn_implementation(attn_implementation)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    suppress_special_tokens(model, processor.tokenizer)
    return model.eval(), processor


def save_tiny_gemma3(model: Gemma3ForConditionalGeneration, processor: Gemma3Processor, directory: Path) -> Path:
    """Write model and processor to ``directory`` (``AutoModelForImageTextToText`` / ``AutoProcessor`` load it)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def load_tiny_gemma3(directory: Path, attn_implementation: str = "sdpa") -> tuple[torch.nn.Module, object]:
    """Model (eval) and processor back from ``save_tiny_gemma3``'s directory, offline."""
    model = AutoModelForImageTextToText.from_pretrained(
        directory, local_files_only=True, attn_implementation=attn_implementation
    )
    return model.eval(), AutoProcessor.from_pretrained(directory, local_files_only=True)


@torch.no_grad()
def attend_to_bright_tokens(model: Gemma3ForConditionalGeneration, layer: int = 0) -> None:
    """Rewire ``model`` in place so that at decoder block ``layer`` (must be 0) every text query attends to
    the image tokens whose 2 x 2 patches are mostly bright (normalised pixel mean above 0.5).

    Through the real pixel path:

    * SigLIP: the patch embedding puts a patch's mean normalised value in channel 0 (other channels zero),
      the position embedding subtracts 0.5 there, the encoder layers add nothing (zero output projections),
      and the post-LayerNorm turns channel 0's sign into ``+u`` (bright) or ``-u`` (dark, and the letterbox
      padding at the mean colour, which normalises to about 0);
    * projector: the 2 x 2 average pool and the soft-embedding RMSNorm keep the majority sign (a tie gives
      zero), and the projection copies vision channel 0 to text channel 0;
    * block 0: keys read text channel 0, queries read channel 1, which every text token's embedding sets to
      a large constant; both use the slowest rotary pair, so positions barely rotate them, and the q/k norms
      scale them to a fixed length. Bright image keys score about +13, dark ones about -13.
    """
    if layer != 0:
        raise ValueError("the construction acts on the input of decoder block 0")
    tower = model.model.vision_tower
    vision = getattr(tower, "vision_model", tower)
    patch = vision.embeddings.patch_embedding
    patch.weight.zero_()
    patch.bias.zero_()
    patch.weight[0] = 1.0 / (patch.weight.shape[1] * patch.weight.shape[2] * patch.weight.shape[3])
    vision.embeddings.position_embedding.weight.zero_()
    vision.embeddings.position_embedding.weight[:, 0] = -0.5
    for block in vision.encoder.layers:
        for linear in (block.self_attn.out_proj, block.mlp.fc2):
            linear.weight.zero_()
            linear.bias.zero_()
    vision.post_layernorm.weight.fill_(1.0)
    vision.post_layernorm.bias.zero_()
    projector = model.model.multi_modal_projector
    projector.mm_soft_emb_norm.weight.zero_()
    projector.mm_input_projection_weight.zero_()
    projector.mm_input_projection_weight[0, 0] = 1.0

    language_model = model.model.language_model
    language_model.embed_tokens.weight[:, 1] = 10.0
    block = language_model.layers[layer]
    block.input_layernorm.weight.zero_()
    attention = block.self_attn
    attention.q_norm.weight.fill_(1.0)
    attention.k_norm.weight.fill_(1.0)
    reward_feature_zero(attention)
