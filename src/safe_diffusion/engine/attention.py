"""Cross-attention maps of the concept rows, for terms that observe them (LEDITS++'s implicit masks, §3.3).

Families whose denoiser attends to the text through *cross*-attention — the UNet families (SD 1.x/2.x,
SDXL) and PixArt's transformer blocks — have maps from each latent position to each text token; they
are read here by forward pre-hooks on the cross-attention layers (``attn2``) that exist only while a
run that needs them is going on, and that recompute the attention probabilities of the concept rows
only. Families with *joint* attention (SD3, FLUX, Qwen-Image) have no such layer: image and text
tokens share one softmax, so there is no map that means what the paper's M¹ means, and terms that
need one are refused there (see docs/sanitize.md).

UNets are read at 1/4 of the latent size, as LEDITS++ does (the down and up blocks, not the mid
block), or at the nearest resolution the UNet has; transformers at their patch resolution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: LEDITS++ reads a UNet's cross-attention at 1/4 of the latent resolution (16x16 for SD at 512 px).
ATTENTION_FACTOR = 4


def cross_attention_layers(model) -> dict[int, list]:
    """The model's cross-attention modules by their resolution factor relative to the latents (1, 2, 4, …).

    UNets: the ``attn2`` layers of the down and up blocks (the mid block left out, as in LEDITS++).
    Transformers with cross-attention blocks (PixArt): every block's ``attn2``, at the patch size.
    Empty for models without cross-attention to text.
    """
    from diffusers.models.attention_processor import Attention

    model = getattr(model, "_orig_mod", model)
    n_up = len(getattr(model, "up_blocks", None) or [])
    patch = getattr(getattr(model, "config", None), "patch_size", None)
    layers: dict[int, list] = {}
    for name, module in model.named_modules():
        if not isinstance(module, Attention) or name.split(".")[-1] != "attn2":
            continue
        if not getattr(module, "is_cross_attention", False):
            continue
        parts = name.split(".")
        if parts[0] == "down_blocks":
            factor = 2 ** int(parts[1])
        elif parts[0] == "up_blocks":
            factor = 2 ** (n_up - 1 - int(parts[1]))
        elif parts[0] == "transformer_blocks" and patch:
            factor = int(patch)
        else:
            continue
        layers.setdefault(factor, []).append(module)
    return layers


def attention_factor(model) -> int | None:
    """The resolution factor maps are read at: 4 (LEDITS++'s), or the nearest one the model has; None without any."""
    factors = sorted(cross_attention_layers(model))
    if not factors:
        return None
    return min(factors, key=lambda f: (abs(math.log2(f) - math.log2(ATTENTION_FACTOR)), -f))


class AttentionObserver:
    """While armed, every denoiser call sums the armed rows' cross-attention probabilities over the heads of
    the layers at one resolution; :meth:`maps` averages them over heads and layers, per block of rows."""

    def __init__(self, model, factor: int):
        self.factor = factor
        self.layers = cross_attention_layers(model)[factor]
        self.total_heads = sum(m.heads for m in self.layers)
        self.first_row = self.n_rows = self.offset = 0
        self.queries = 0
        self.spatial: list[int] = []
        self.sums: torch.Tensor | None = None
        self.armed = False
        self._handles: list = []

    def close(self) -> None:
        self.disarm()

    def arm(self, first_row: int, n_rows: int, latent_spatial: Sequence[int]) -> None:
        """Capture rows ``first_row … first_row + n_rows`` of the next denoiser evaluation (latents of `latent_spatial`)."""
        self.spatial = [math.ceil(s / self.factor) for s in latent_spatial]
        self.queries = math.prod(self.spatial)
        self.first_row, self.n_rows, self.offset = first_row, n_rows, 0
        self.sums, self.armed = None, True
        if not self._handles:
            self._handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in self.layers]

    def disarm(self) -> None:
        """Stop capturing and remove the hooks (they exist only while armed)."""
        self.armed = False
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def set_offset(self, offset: int) -> None:
        """The first row of the chunk the denoiser evaluates next (a caller evaluating rows in chunks)."""
        self.offset = offset

    @torch.compiler.disable
    def _hook(self, module, args, kwargs):
        if not self.armed:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if context is None or hidden.ndim != 3 or hidden.shape[1] != self.queries:
            return
        lo = max(self.first_row - self.offset, 0)
        hi = min(self.first_row + self.n_rows - self.offset, hidden.shape[0])
        if lo >= hi:
            return
        context = context[lo:hi]
        if module.norm_cross:
            context = module.norm_encoder_hidden_states(context)
        query = module.head_to_batch_dim(module.to_q(hidden[lo:hi]))
        key = module.head_to_batch_dim(module.to_k(context))
        mask = kwargs.get("attention_mask")
        if mask is not None:
            mask = module.prepare_attention_mask(mask[lo:hi], key.shape[1], hi - lo)
        probs = module.get_attention_scores(query, key, mask)
        probs = probs.reshape(hi - lo, module.heads, *probs.shape[1:]).sum(dim=1)
        if self.sums is None:
            dtype = torch.promote_types(probs.dtype, torch.float32)
            self.sums = torch.zeros(self.n_rows, *probs.shape[1:], dtype=dtype, device=probs.device)
        start = self.offset + lo - self.first_row
        self.sums[start : start + (hi - lo)] += probs.detach().to(self.sums.dtype)

    def maps(self, blocks: int, batch: int) -> list[torch.Tensor]:
        """Per block of `batch` rows, its maps (batch, *spatial, tokens): head- and layer-averaged probabilities."""
        if self.sums is None:
            raise RuntimeError("no cross-attention was captured during the denoiser call")
        mean = self.sums / self.total_heads
        return [mean[b * batch : (b + 1) * batch].reshape(batch, *self.spatial, mean.shape[-1]) for b in range(blocks)]


def token_span(pipe, text: str, max_length: int) -> slice:
    """The positions of `text`'s own tokens in the pipeline's (last) tokenizer, start and end tokens excluded."""
    tokenizer = getattr(pipe, "tokenizer_2", None) or getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"{type(pipe).__name__} has no tokenizer to find a concept's tokens with")
    ids = tokenizer(text, truncation=True, max_length=max_length).input_ids
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    own = [i for i, token in enumerate(ids) if token not in special]
    if not own:
        return slice(1, max(len(ids) - 1, 2))
    return slice(own[0], own[-1] + 1)
