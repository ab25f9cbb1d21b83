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


#: ``size="0.5b"``: the architecture of llava-hf/llava-onevision-qwen2-0.5b-ov-hf, which LlavaGuard v1.2 0.5B
#: fine-tunes (SigLIP so400m at 384 px in 14-px patches, Qwen2-0.5B, anyres tiles up to 6x6, at most 9 kept).
REAL_0_5B = dict(
    vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16),
    text=dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
    ),
    image_size=384,
    patch_size=14,
    grid=6,
)


def build_llava_onevision(
    path: str | Path, seed: int = 0, image_size: int = 32, patch_size: int = 8, size: str = "tiny"
) -> Path:
    """Save a random LLaVA-OneVision (model, tokenizer, image processor, chat template) at `path`.

    ``size="tiny"``: the vision tower sees `image_size` squares in `patch_size` patches; anyres tiles
    images onto up to 2x2 of those squares. ``size="0.5b"``: LlavaGuard v1.2 0.5B's real architecture
    (:data:`REAL_0_5B`; `image_size` and `patch_size` are ignored), built without default
    initialisation (:func:`~safe_diffusion.testing.realsize.materialize`) and saved in bfloat16.
    Returns `path`.
    """
    if size not in ("tiny", "0.5b"):
        raise ValueError(f"size must be 'tiny' or '0.5b', got {size!r}")
    real = size == "0.5b"
    if real:
        image_size, patch_size = REAL_0_5B["image_size"], REAL_0_5B["patch_size"]
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
    sides = range(1, (REAL_0_5B["grid"] if real else 2) + 1)
    grid = [[image_size * h, image_size * w] for h in sides for w in sides]
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_grid_pinpoints=grid
    )
    num_image_tokens = (image_size // patch_size) ** 2
    processor = _processor_class()(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        num_image_tokens=num_image_tokens,
        vision_feature_select_strategy="full",
    )
    vision_dims = (
        REAL_0_5B["vision"]
        if real
        else dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    )
    text_dims = (
        REAL_0_5B["text"]
        if real
        else dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    vision = SiglipVisionConfig(**vision_dims, image_size=image_size, patch_size=patch_size, vision_use_head=False)
    text = Qwen2Config(
        **text_dims,
        # the official policy is ~5,500 bytes, one token each with this tokenizer, plus the image tokens
        max_position_embeddings=32768 if real else 8192,
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
    if real:
        from .realsize import build_model

        model = build_model(lambda: LlavaOnevisionForConditionalGeneration(config), torch.bfloat16, "cpu", seed)
    else:
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
