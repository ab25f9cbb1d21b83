"""A tiny random-weight LLaVA-OneVision checkpoint (LlavaGuard's architecture), built fully offline.

Same layout as a LlavaGuard ``-hf`` checkpoint: a SigLIP vision tower, a Qwen2 language model, the
anyres image processor, a ChatML chat template (``<|im_start|>user\\n<image>\\n…<|im_end|>``), all
loadable with ``from_pretrained``. The tokenizer is byte-level BPE with no merges (one token per
byte), built with the ``tokenizers`` library. Its answers are noise: it tests the judge's
plumbing (prompting, batching, decoding, recording unparseable answers), not its verdicts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

#: The template a LLaVA-OneVision chat checkpoint renders one user turn with: images first, then text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")


def byte_level_bpe_tokenizer():
    """A Qwen2-style byte-level BPE tokenizer with no merges and ChatML's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .stable_diffusion import _byte_alphabet

    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(_byte_alphabet())}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )


def build_llava_onevision(path: str | Path, seed: int = 0, image_size: int = 32, patch_size: int = 8) -> Path:
    """Save a tiny random LLaVA-OneVision (model, tokenizer, image processor, chat template) at `path`.

    The vision tower sees `image_size` squares in `patch_size` patches; anyres tiles images onto up
    to 2x2 of those squares. Returns `path`.
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from ..judges.llavaguard import _processor_class

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = byte_level_bpe_tokenizer()
    grid = [[image_size * h, image_size * w] for h in (1, 2) for w in (1, 2)]
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": image_size, "width": image_size}, image_grid_pinpoints=grid)
    num_image_tokens = (image_size // patch_size) ** 2
    processor = _processor_class()(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        num_image_tokens=num_image_tokens,
        vision_feature_select_strategy="full",
    )
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,  # the official policy is ~5,500 bytes, one token each here
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=grid,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    image_processor.save_pretrained(path)  # preprocessor_config.json too, as the hub checkpoints have it
    # Name the stock processor class, as a real checkpoint does (AutoProcessor finds it where torchvision is installed).
    for name in ("processor_config.json", "tokenizer_config.json"):
        meta = json.loads((path / name).read_text())
        meta["processor_class"] = "LlavaOnevisionProcessor"
        (path / name).write_text(json.dumps(meta, indent=2) + "\n")
    return path
