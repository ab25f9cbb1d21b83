"""Parts the random-weight family builders share: offline tokenizers, tiny text encoders and VAEs.

Every tokenizer is built from a `tokenizers` model in memory (no download): a character-level T5
tokenizer (a Unigram model whose pieces are single characters) and a byte-level BPE tokenizer with
no merges for Qwen; the CLIP one lives in :mod:`.stable_diffusion`.
"""

from __future__ import annotations

import string

import torch


def char_t5_tokenizer(model_max_length: int = 512):
    """A T5 tokenizer whose pieces are single characters (plus ▁ for spaces), ``</s>`` appended to every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5Tokenizer

    chars = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(c, -2.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5Tokenizer(
        tokenizer_object=tok,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=model_max_length,
    )


def byte_bpe_tokenizer():
    """A Qwen2 tokenizer with a byte-level vocabulary, no merges, and the chat template's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2Tokenizer

    from .stable_diffusion import _byte_alphabet

    vocab = {c: i for i, c in enumerate(_byte_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return Qwen2Tokenizer(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None
    )


def t5_encoder(vocab_size: int, d_model: int = 32, umt5: bool = False):
    """A two-layer random T5 (or UMT5) encoder."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=d_model * 2,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return model_cls(config)


def clip_encoder(vocab_size: int, bos: int, eos: int, pad: int, hidden: int = 32, projection: bool = False):
    """A two-layer random CLIP text encoder (with a text projection for pooled embeddings if `projection`)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act="gelu",
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def kl_vae(latent_channels: int = 4, shift_factor: float | None = None, scaling_factor: float = 0.18215):
    """A random two-level KL VAE (downscale 2)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
        use_quant_conv=shift_factor is None,
        use_post_quant_conv=shift_factor is None,
    )


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
