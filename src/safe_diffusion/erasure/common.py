"""What every erasure method shares: concept embeddings, the modules it edits, progress reporting.

Embeddings come from the pipeline's own ``encode_prompt``, so they are exactly what the UNet sees at
generation time: the final layer of CLIP for SD 1.x/2.x, both text encoders' penultimate layers
concatenated for SDXL (as in the official UCE and ESD code for each family).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..common.errors import InputError


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


@torch.no_grad()
def encode(pipe, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text embeddings (n, L, d) of `texts` as the pipeline conditions its UNet on them, and, for
    SDXL, the pooled embeddings (n, d_pooled) its added conditioning needs (None otherwise)."""
    out = pipe.encode_prompt(
        prompt=list(texts), device=pipe.unet.device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    if is_sdxl(pipe):
        return out[0], out[2]
    return out[0], None


def last_token_index(pipe, texts: Sequence[str]) -> torch.Tensor:
    """Index of each text's last token before the end-of-text token (the official UCE code's choice:
    attention-mask length − 2). For the empty text that is the start-of-text token, index 0."""
    tok = pipe.tokenizer(
        list(texts),
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return tok["attention_mask"].sum(dim=1) - 2


def concept_embeddings(pipe, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """One embedding per text (n, d): the final token's, the one UCE edits with."""
    rows = []
    for i in range(0, len(texts), batch_size):
        chunk = list(texts[i : i + batch_size])
        embeds, _ = encode(pipe, chunk)
        index = last_token_index(pipe, chunk).to(embeds.device)
        rows.append(embeds[torch.arange(len(chunk), device=embeds.device), index])
    return torch.cat(rows)


def sequence_embeddings(pipe, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """The whole padded embedding sequence of each text (n, L, d), the one RECE edits with."""
    return torch.cat([encode(pipe, list(texts[i : i + batch_size]))[0] for i in range(0, len(texts), batch_size)])


def cross_attention_dim(pipe) -> int:
    """The size of the text embeddings the UNet's cross-attention reads."""
    dim = pipe.unet.config.cross_attention_dim
    return dim if isinstance(dim, int) else dim[0]


def cross_attention_projections(unet, text_dim: int | None = None) -> dict[str, torch.nn.Linear]:
    """The UNet's cross-attention key and value projections, by module name (``…attn2.to_k``, ``…attn2.to_v``),
    in module order. Only projections that read text (``in_features`` equal to the text embedding size) count."""
    found = {}
    for name, module in unet.named_modules():
        if ".attn2." not in f".{name}" or not name.endswith(("attn2.to_k", "attn2.to_v")):
            continue
        if isinstance(module, torch.nn.Linear) and (text_dim is None or module.in_features == text_dim):
            found[name] = module
    return found


def require_cross_attention(pipe, model: str) -> dict[str, torch.nn.Linear]:
    """:func:`cross_attention_projections`, or a one-line error when the model has none to edit."""
    projections = cross_attention_projections(pipe.unet, cross_attention_dim(pipe))
    if not projections:
        raise InputError(
            f"model {model!r} has no text cross-attention (attn2.to_k / attn2.to_v) to edit; "
            "concept erasure needs a text-conditioned UNet"
        )
    return projections


def esd_parameter_names(unet, method: str) -> list[str]:
    """The UNet parameters ESD fine-tunes, by name.

    ``esd-x``: every parameter of the cross-attention blocks (``attn2``: to_q, to_k, to_v, to_out).
    ``esd-u``: every other parameter except the time (and SDXL's added) embedding and the output
    layers (``conv_norm_out``, ``conv_out``), as the paper's ``noxattn`` selection (CompVis names
    ``time_embed`` and ``out.``).
    """
    names = []
    if method not in ("esd-x", "esd-u"):
        raise ValueError(f"not an ESD method: {method!r}")
    excluded = ("time_embedding.", "add_embedding.", "conv_norm_out.", "conv_out.")
    for name, _ in unet.named_parameters():
        in_xattn = ".attn2." in f".{name}"
        if in_xattn if method == "esd-x" else not (in_xattn or name.startswith(excluded)):
            names.append(name)
    return names


def move(model, device=None, dtype: torch.dtype | None = None):
    """``model.to(device)``, then ``.to(dtype)`` only when it changes something: diffusers warns on every
    dtype cast of a model that lists no float32-only modules, which is noise here."""
    if device is not None:
        model = model.to(device)
    if dtype is not None and model.dtype != dtype:
        from diffusers.utils import logging as diffusers_logging

        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            model = model.to(dtype)
        finally:
            diffusers_logging.set_verbosity(verbosity)
    return model
