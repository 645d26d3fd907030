"""Tiny Idefics3 and SmolVLM models with their processors, built offline with random weights.

Both families share one layout (SmolVLM is Idefics3 with another tokenizer and checkpoint), so one
builder makes either: a SigLIP-like vision tower whose square crops of ``max_image_size`` pixels are
cut into ``patch_size`` patches, pixel-shuffled by ``scale_factor`` into ``image_seq_len`` tokens, and
a Llama. The processor splits an image into a grid of crops plus a global image
(``Idefics3ImageProcessor`` / ``SmolVLMImageProcessor`` with small explicit sizes), the tokenizer is a
word-level one made with ``tokenizers`` holding the family's special tokens, and the chat template has
the real checkpoints' structure: ``<|begin_of_text|>User:<image>question<end_of_utterance>\\nAssistant:``
for Idefics3, ``<|im_start|>User:...`` for SmolVLM.

The default SmolVLM is built with a crop side (34) that is not a multiple of the patch size (4), as
SmolVLM-Instruct's 384-pixel crops are not of its 14-pixel patches: the patch grid then covers only
the top-left 32 x 32 pixels of each crop, which the adapter's geometry must account for.

Example:
    >>> model, processor = build_tiny_idefics3(seed=0)  # doctest: +SKIP
    >>> processor.image_seq_len
    16
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from api_tool.demo.tiny_llava import vocabulary
from tests.tiny_lvlms import suppress_special_tokens
from tests.tiny_models import reward_feature_zero

ROW_COL_TOKENS: tuple[str, ...] = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))
FAMILY_TOKENS = {
    "idefics3": {"bos": "<|begin_of_text|>"},
    "smolvlm": {"bos": "<|im_start|>"},
}
CHAT_TEMPLATE = (
    "{bos}{{% for message in messages %}}{{{{message['role'].capitalize()}}}}"
    "{{% if message['content'][0]['type'] == 'image' %}}{{{{':'}}}}{{% else %}}{{{{': '}}}}{{% endif %}}"
    "{{% for line in message['content'] %}}{{% if line['type'] == 'text' %}}{{{{line['text']}}}}"
    "{{% elif line['type'] == 'image' %}}{{{{ '<image>' }}}}{{% endif %}}{{% endfor %}}"
    "<end_of_utterance>\n{{% endfor %}}{{% if add_generation_prompt %}}{{{{ 'Assistant:' }}}}{{% endif %}}"
)
"""The Idefics3 / SmolVLM chat template (as in the checkpoints' ``chat_template.json``), with the
family's begin-of-text token put in front."""


def chat_template(family: str) -> str:
    """The chat template of ``family`` ("idefics3" or "smolvlm")."""
    return CHAT_TEMPLATE.format(bos=FAMILY_TOKENS[family]["bos"])


def build_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with the family's special tokens; it adds no BOS (the template does)."""
    bos = FAMILY_TOKENS[family]["bos"]
    special = [
        "<pad>",
        "<unk>",
        bos,
        "<end_of_utterance>",
        "<fake_token_around_image>",
        "<image>",
        "<global-img>",
        "<video>",
        *ROW_COL_TOKENS,
    ]
    tokens = [*special, *vocabulary()]
    backend = Tokenizer(models.WordLevel({token: index for index, token in enumerate(tokens)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens(special)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token="<end_of_utterance>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
            "video_token": "<video>",
        },
    )


def build_processor(
    family: str = "idefics3",
    *,
    max_image_size: int = 32,
    longest_edge: int = 96,
    patch_size: int = 4,
    scale_factor: int = 2,
) -> Any:
    """The family's processor: crops of ``max_image_size`` pixels, images resized to ``longest_edge``
    first (so at most ``longest_edge / max_image_size`` crops a side), ``image_seq_len`` from the patch
    grid that fits in a crop."""
    side = max_image_size // patch_size // scale_factor
    sizes = {"size": {"longest_edge": longest_edge}, "max_image_size": {"longest_edge": max_image_size}}
    tokenizer = build_tokenizer(family)
    if family == "idefics3":
        return Idefics3Processor(
            image_processor=Idefics3ImageProcessor(**sizes),
            tokenizer=tokenizer,
            image_seq_len=side * side,
            chat_template=chat_template(family),
        )
    from transformers import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    return SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(**sizes),
        tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(**sizes),
        image_seq_len=side * side,
        chat_template=chat_template(family),
    )


def build_config(
    processor: Any,
    family: str = "idefics3",
    *,
    patch_size: int = 4,
    scale_factor: int = 2,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vision_hidden: int = 32,
    vision_layers: int = 1,
) -> Idefics3Config:
    """An Idefics3 / SmolVLM config matching ``processor`` (vision ``image_size`` = crop side)."""
    tokenizer = processor.tokenizer
    special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id}
    vision = {
        "hidden_size": vision_hidden,
        "intermediate_size": 2 * vision_hidden,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": 2,
        "image_size": int(processor.image_processor.max_image_size["longest_edge"]),
        "patch_size": patch_size,
    }
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        **special,
    )
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    if family == "idefics3":
        return Idefics3Config(
            vision_config=Idefics3VisionConfig(**vision),
            text_config=text_config,
            image_token_id=image_token_id,
            scale_factor=scale_factor,
            pad_token_id=tokenizer.pad_token_id,
        )
    from transformers import SmolVLMConfig, SmolVLMVisionConfig

    return SmolVLMConfig(
        vision_config=SmolVLMVisionConfig(**vision),
        text_config=text_config,
        image_token_id=image_token_id,
        scale_factor=scale_factor,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_idefics3(
    seed: int = 0,
    *,
    family: str = "idefics3",
    max_image_size: int | None = None,
    longest_edge: int = 96,
    patch_size: int = 4,
    scale_factor: int = 2,
    layers: int = 2,
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """A random-weight ``Idefics3ForConditionalGeneration`` (or ``SmolVLMForConditionalGeneration`` with
    ``family="smolvlm"``) and its processor; eval mode, float32. The same ``seed`` gives the same weights.

    Defaults: crops of 32 pixels for Idefics3 (8 x 8 patches of 4 pixels, 4 x 4 tokens a crop), 34 pixels
    for SmolVLM (the same grid, covering the crop's top-left 32 x 32 pixels); images resized to a longest
    edge of 96 first (at most 3 x 3 crops); a 2-block Llama with 4 query heads over 2 KV heads.
    """
    side = max_image_size or (32 if family == "idefics3" else 34)
    processor = build_processor(
        family, max_image_size=side, longest_edge=longest_edge, patch_size=patch_size, scale_factor=scale_factor
    )
    config = build_config(processor, family, patch_size=patch_size, scale_factor=scale_factor, layers=layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "idefics3":
            model = Idefics3ForConditionalGeneration(config)
        else:
            from transformers import SmolVLMForConditionalGeneration

            model = SmolVLMForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    tokenizer = processor.tokenizer
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    suppress_special_tokens(model, tokenizer)
    return model.float().eval(), processor


def build_tiny_smolvlm(seed: int = 0, **kwargs: Any) -> tuple[Any, Any]:
    """``build_tiny_idefics3(seed, family="smolvlm", ...)``."""
    return build_tiny_idefics3(seed, family="smolvlm", **kwargs)


def save_and_load(model: Any, processor: Any, directory: Path, attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """Round-trip through ``save_pretrained`` / ``AutoModelForImageTextToText`` + ``AutoProcessor``."""
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    loaded = AutoModelForImageTextToText.from_pretrained(
        directory, local_files_only=True, attn_implementation=attn_implementation
    )
    return loaded.eval(), AutoProcessor.from_pretrained(directory, local_files_only=True)


@torch.no_grad()
def attend_to_bright_patches(model: Any) -> None:
    """Rewire ``model`` in place so that at decoder block 0 every query attends to the image tokens of
    bright patches and ignores dark ones (an Idefics3 / SmolVLM twin of ``tests.tiny_models``' LLaVA one).

    * vision tower: the patch embedding puts a patch's mean normalised value (-1 black .. +1 white) in
      channel 0, plus a bias of -0.5, so bright patches are positive and dark ones negative; position
      embeddings and every encoder layer's residual branches are zero; the post-LayerNorm (weight 1,
      bias 0) turns channel 0's sign into a fixed vector ``+u`` (bright) or ``-u`` (dark);
    * connector: pixel shuffle stacks the ``s x s`` patches of a token; the (linear) projection puts the
      mean of their channel 0, times 4, in text channel 0 and zero elsewhere: about +22 for a token whose
      patches are all bright, -22 for an all-dark one;
    * block 0's keys read text channel 0 and its queries channel 1 (a large constant in every token
      embedding), both on the slowest rotary pair, so position barely rotates them. Scores: about
      +16 for an all-bright image token, -16 for an all-dark one, near 0 for an even mix.
    """
    vision = model.model.vision_model
    embeddings = vision.embeddings
    patch = embeddings.patch_embedding
    patch.weight.zero_()
    patch.bias.zero_()
    patch.weight[0] = 1.0 / (patch.weight.shape[1] * patch.weight.shape[2] * patch.weight.shape[3])
    patch.bias[0] = -0.5
    embeddings.position_embedding.weight.zero_()
    for block in vision.encoder.layers:
        for linear in (block.self_attn.out_proj, block.mlp.fc2):
            linear.weight.zero_()
            linear.bias.zero_()
    vision.post_layernorm.weight.fill_(1.0)
    vision.post_layernorm.bias.zero_()
    vision_hidden = vision.post_layernorm.weight.shape[0]
    proj = model.model.connector.modality_projection.proj
    proj.weight.zero_()
    scale = int(model.config.scale_factor)
    # after the shuffle, feature index (block * vision_hidden + channel): sum channel 0 of every block
    for block_index in range(scale * scale):
        proj.weight[0, block_index * vision_hidden] = 4.0 / (scale * scale)

    language_model = model.model.text_model
    language_model.embed_tokens.weight[:, 1] = 10.0
    language_model.embed_tokens.weight[:, 0] = 0.0
    block = language_model.layers[0]
    block.input_layernorm.weight.fill_(1.0)
    attention = block.self_attn
    reward_feature_zero(attention)
