"""A port of the official SAFREE code (github.com/jaehong31/SAFREE, commit b8b2c3f), written for these tests
as an oracle: it follows the official pipelines' math and control flow step by step, in its own words.

Ported: models/modified_stable_diffusion_pipeline.py (SD 1.x/2.x: trigger-token projection, the
self-validating filter, the ``-lra`` three-block batch), models/modified_stable_diffusion_xl_pipeline.py
(SDXL: the second encoder's columns, every step filtered), sdv3/sdv3_pipeline.py (SD 3: T5 vectors, every
step filtered), free_lunch_utils.py (the "low" Fourier filter on the up blocks' skip features).

Where the port generalises the official code (all recorded in docs/guidance.md, "SAFREE"):

* the official code handles one prompt and one image; the port does the same (tests compare batches
  against single-prompt runs);
* sizes the official code hard-codes for the real models are read from the tiny ones: 768 (SDXL's first
  encoder width), 77 + 256 (SD 3's sequence), 256 (SD 3's T5 length), 1280/640 (the up-block widths);
* computations the official code does in float32 or bfloat16 (SD 3's distances, the Fourier filter) run in
  the pipeline's float64, so that parity is measured in float64;
* the latent re-attention filter acts only at the steps where the filtered embedding is used (the
  official code would also act at the others, where it compares two equal blocks; its released scripts
  never enable the filter at all: generate_safree.py:227-228 registers the blocks without a SAFREE mode).
"""

from __future__ import annotations

import math

import torch

NUDITY = [
    "Sexual Acts", "Content Meant to Arouse Sexual Excitement", "Nudity", "Pornography", "Erotic Art", "Lustful",
    "Seductive", "Orgasmic", "Libido", "Kinky", "Sexual Orientation", "Sexual Attraction", "Sexual Intercourse",
    "Sexual Pleasure", "Sexual Fantasy", "Carnal Desires", "Sexual Gratification",
]  # fmt: skip


# -- the official helper functions --------------------------------------------------------------------------


def projection_matrix(E):
    """Projection onto the column span of E (d, k): E (EᵀE)⁺ Eᵀ."""
    return E @ torch.pinverse(E.T @ E) @ E.T


def safree_projection(input_embeddings, p_emb, ms, cs, alpha, max_length):
    """[negative; prompt] (2, L, d) with the prompt's trigger tokens projected; also the keep vector."""
    n_t, dim = p_emb.shape
    complement = torch.eye(dim, dtype=cs.dtype) - cs
    dist = torch.norm(complement @ p_emb.T, dim=0)
    means = []
    for i in range(n_t):
        means.append(torch.mean(torch.cat((dist[:i], dist[i + 1 :]))))
    mean_dist = torch.tensor(means, dtype=dist.dtype)
    keep_tokens = (dist < (1.0 + alpha) * mean_dist).to(dist.dtype)
    keep = torch.ones(max_length, dtype=dist.dtype)
    keep[1 : n_t + 1] = keep_tokens
    keep = keep.unsqueeze(1)
    uncond, text = input_embeddings.chunk(2)
    text = text.squeeze(0)
    projected = (complement @ ms @ text.T).T
    merged = torch.where(keep.bool(), text, projected)
    return torch.cat([uncond, merged.unsqueeze(0)]), keep.squeeze(1).bool()


def projection_and_orthogonal(input_embeddings, ms, cs):
    dim = ms.shape[0]
    uncond, text = input_embeddings.chunk(2)
    projected = (torch.eye(dim, dtype=cs.dtype) - cs) @ ms @ text.squeeze(0).T
    return torch.cat([uncond, projected.T[None]])


def f_beta(z, upperbound_timestep=10, concept_type="nudity"):
    t, k = (5.5, 3.5) if "artists-" in concept_type else (5.333, 2.5)
    value = 1 / (1 + math.exp(-(2.0 * k * (10 * z - t))))
    return round(upperbound_timestep * value)


def low_fourier_filter(x, threshold, scale):
    """SafeGuard_Low_Fourier_filter: rows [uncond, filtered, original]; row 1's low frequencies where the
    original's real part does not exceed it are set to `scale` (in x's dtype; the official code casts to float32)."""
    freq = torch.fft.fftshift(torch.fft.fftn(x, dim=(-2, -1)), dim=(-2, -1))
    _, _, h, w = freq.shape
    ch, cw = h // 2, w // 2
    low = freq[..., ch - threshold : ch + threshold, cw - threshold : cw + threshold]
    difference = low[2] - low[1]
    mask = torch.where(difference.real > 0.0, low[1], scale)
    freq[1, :, ch - threshold : ch + threshold, cw - threshold : cw + threshold] = mask
    return torch.fft.ifftn(torch.fft.ifftshift(freq, dim=(-2, -1)), dim=(-2, -1)).real


# -- SD 1.x/2.x ---------------------------------------------------------------------------------------------


def _sd_masked_pooled(pipe, prompt):
    ids = pipe.tokenizer(prompt, padding="longest", return_tensors="pt").input_ids
    n = ids.shape[1] - 2
    if ids.shape[1] > pipe.tokenizer.model_max_length:
        ids = ids[:, : pipe.tokenizer.model_max_length]
        n = pipe.tokenizer.model_max_length - 2
    masked = ids.repeat(n, 1)
    for i in range(n):
        masked[i, i + 1] = 0
    return pipe.text_encoder(masked, attention_mask=None).pooler_output


def _sd_encode(pipe, prompt, negative_prompt):
    tok = pipe.tokenizer
    text_inputs = tok(
        prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    )
    text = pipe.text_encoder(text_inputs.input_ids, attention_mask=None)[0]
    uncond_inputs = tok([negative_prompt], padding="max_length", max_length=text_inputs.input_ids.shape[-1],
                        truncation=True, return_tensors="pt")  # fmt: skip
    uncond = pipe.text_encoder(uncond_inputs.input_ids, attention_mask=None)[0]
    return torch.cat([uncond, text]), text_inputs.attention_mask


class _UpBlocks:
    """The official register_free_upblock2d / register_free_crossattn_upblock2d with the "low" mode, as forward
    replacements on the pipeline's up blocks (removed on exit)."""

    def __init__(self, unet, b1, b2, s1, s2):
        widths = sorted(set(unet.config.block_out_channels), reverse=True)
        self.first, self.second = widths[0], (widths[1] if len(widths) > 1 else None)  # 1280 and 640 in SD
        self.unet, self.b, self.s = unet, (b1, b2), (s1, s2)
        self.active = False

    def _freeu(self, hidden, res):
        if not self.active:
            return hidden, res
        for width, b, s in ((self.first, self.b[0], self.s[0]), (self.second, self.b[1], self.s[1])):
            if width is not None and hidden.shape[1] == width:
                half = width // 2
                hidden = hidden.clone()
                hidden[:, :half] = hidden[:, :half] * b
                res = low_fourier_filter(res, threshold=1, scale=s)
        return hidden, res

    def _forward(self, block):
        def forward(hidden_states, res_hidden_states_tuple, temb=None, encoder_hidden_states=None,
                    cross_attention_kwargs=None, upsample_size=None, attention_mask=None, encoder_attention_mask=None):  # fmt: skip
            attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
            for resnet, attn in zip(block.resnets, attentions):
                res = res_hidden_states_tuple[-1]
                res_hidden_states_tuple = res_hidden_states_tuple[:-1]
                hidden_states, res = self._freeu(hidden_states, res)
                hidden_states = torch.cat([hidden_states, res], dim=1)
                hidden_states = resnet(hidden_states, temb)
                if attn is not None:
                    hidden_states = attn(hidden_states, encoder_hidden_states=encoder_hidden_states,
                                         cross_attention_kwargs=cross_attention_kwargs)[0]  # fmt: skip
            for upsampler in block.upsamplers or []:
                hidden_states = upsampler(hidden_states, upsample_size)
            return hidden_states

        return forward

    def __enter__(self):
        for block in self.unet.up_blocks:
            block.forward = self._forward(block)
        return self

    def __exit__(self, *exc):
        for block in self.unet.up_blocks:
            del block.forward


def sd(pipe, prompt, *, latents, steps, guidance_scale=7.5, concepts=NUDITY, alpha=0.01, safree=True, svf=True,
       lra=False, lra_filter=False, up_t=10, category="nudity", re_attn_t=(-1, 1001), freeu=(1.0, 1.0, 0.9, 0.2)):  # fmt: skip
    """ModifiedStableDiffusionPipeline.__call__ with generate_safree.py's arguments; returns the final latents,
    the encoder_hidden_states of every step, the keep vector and the self-validating filter's last step."""
    with torch.no_grad():
        negative = ", ".join(concepts)
        text_embeddings, attention_mask = _sd_encode(pipe, prompt, negative)
        rescaled, keep, beta_adjusted = None, None, None
        if safree:
            tok = pipe.tokenizer
            ids = tok(concepts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            concept = pipe.text_encoder(ids.input_ids, attention_mask=ids.attention_mask).pooler_output
            cs = projection_matrix(concept.T)
            masked = _sd_masked_pooled(pipe, prompt)
            ms = projection_matrix(masked.T)
            rescaled, keep = safree_projection(text_embeddings, masked, ms, cs, alpha, text_embeddings.shape[1])
        if svf:
            _, proj = projection_and_orthogonal(text_embeddings, ms, cs).chunk(2)
            _, text = text_embeddings.chunk(2)
            active = attention_mask.squeeze(0) == 1
            sim = torch.nn.functional.cosine_similarity(proj.squeeze(0)[active], text.squeeze(0)[active])
            beta = 1 - sim.mean().item()
            beta_adjusted = f_beta(beta, upperbound_timestep=up_t, concept_type=category)
        pipe.scheduler.set_timesteps(steps)
        latents = latents * pipe.scheduler.init_noise_sigma
        used = []
        blocks = _UpBlocks(pipe.unet, *freeu) if lra_filter else None
        if blocks:
            blocks.__enter__()
        try:
            for i, t in enumerate(pipe.scheduler.timesteps):
                copies = 3 if lra else 2
                model_input = pipe.scheduler.scale_model_input(torch.cat([latents] * copies), t)
                if svf:
                    filtered = safree and i <= beta_adjusted
                else:
                    filtered = safree and re_attn_t[0] <= i <= re_attn_t[1]
                embeddings = rescaled if filtered else text_embeddings
                used.append(embeddings)
                if lra:
                    _, text = text_embeddings.chunk(2)
                    if blocks:
                        blocks.active = filtered
                    out = pipe.unet(model_input, t, encoder_hidden_states=torch.cat([embeddings, text])).sample
                    uncond, cond, _ = out.chunk(3)
                else:
                    out = pipe.unet(model_input, t, encoder_hidden_states=embeddings).sample
                    uncond, cond = out.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
                latents = pipe.scheduler.step(noise, t, latents).prev_sample
        finally:
            if blocks:
                blocks.__exit__()
    return dict(latents=latents, embeddings=used, keep=keep, last_step=beta_adjusted)


# -- SDXL ---------------------------------------------------------------------------------------------------


def sdxl(pipe, prompt, *, latents, steps, guidance_scale=5.0, concepts=NUDITY, alpha=0.01, re_attn_t=(-1, 1001),
         height=32, width=32):  # fmt: skip
    """ModifiedStableDiffusionXLPipeline.__call__ with safree on (no self-validating filter, no re-attention)."""
    with torch.no_grad():
        negative = ", ".join(concepts)
        pe, npe, pooled, npooled = pipe.encode_prompt(prompt, device=torch.device("cpu"), num_images_per_prompt=1,
                                                      do_classifier_free_guidance=True, negative_prompt=negative)  # fmt: skip
        cat = torch.cat([npe, pe])
        first = pipe.text_encoder.config.hidden_size  # the official code's 768 (CLIP ViT-L)
        text_embeddings = cat[..., first:]
        tok = pipe.tokenizer_2
        ids = tok(concepts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        concept = pipe.text_encoder_2(ids.input_ids, output_hidden_states=True)[0]
        cs = projection_matrix(concept.T)
        pids = tok(prompt, padding="longest", return_tensors="pt").input_ids
        n = pids.shape[1] - 2
        masked = pids.repeat(n, 1)
        for i in range(n):
            masked[i, i + 1] = 0
        masked = pipe.text_encoder_2(masked, attention_mask=None)[0]
        ms = projection_matrix(masked.T)
        rescaled, keep = safree_projection(text_embeddings, masked, ms, cs, alpha, text_embeddings.shape[1])
        pipe.scheduler.set_timesteps(steps)
        latents = latents * pipe.scheduler.init_noise_sigma
        time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=pe.dtype,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)  # fmt: skip
        added = {"text_embeds": torch.cat([npooled, pooled]), "time_ids": torch.cat([time_ids, time_ids])}
        used = []
        for i, t in enumerate(pipe.scheduler.timesteps):
            model_input = pipe.scheduler.scale_model_input(torch.cat([latents] * 2), t)
            chosen = rescaled if re_attn_t[0] <= i <= re_attn_t[1] else text_embeddings
            cat = cat.clone()
            cat[..., first:] = chosen
            used.append(cat)
            out = pipe.unet(model_input, t, encoder_hidden_states=cat, added_cond_kwargs=added, return_dict=False)[0]
            uncond, cond = out.chunk(2)
            latents = pipe.scheduler.step(uncond + guidance_scale * (cond - uncond), t, latents, return_dict=False)[0]
    return dict(latents=latents, embeddings=used, keep=keep)


# -- SD 3 ---------------------------------------------------------------------------------------------------


def sd3(pipe, prompt, *, latents, steps, guidance_scale=7.0, concepts=NUDITY, alpha=0.01, max_sequence_length=256):
    """sdv3_pipeline.StableDiffusion3Pipeline.__call__: T5 vectors, every step filtered, concepts as negative prompt."""
    with torch.no_grad():
        negative = ", ".join(concepts)
        pe, npe, pooled, npooled = pipe.encode_prompt(prompt, None, None, negative_prompt=negative,
                                                      do_classifier_free_guidance=True,
                                                      max_sequence_length=max_sequence_length)  # fmt: skip
        tok, enc = pipe.tokenizer_3, pipe.text_encoder_3
        ids = tok(prompt, padding="longest", max_length=max_sequence_length, truncation=True, add_special_tokens=True,
                  return_tensors="pt").input_ids  # fmt: skip
        n = ids.shape[1] - 2
        masked = ids.repeat(n, 1)
        for i in range(n):
            masked[i, i + 1] = 0
        masked = enc(masked, attention_mask=None).last_hidden_state[:, 0, :]
        ms = projection_matrix(masked.T)
        cids = tok(concepts, padding="max_length", max_length=max_sequence_length, truncation=True,
                   add_special_tokens=True, return_tensors="pt")  # fmt: skip
        concept = enc(cids.input_ids, attention_mask=cids.attention_mask).last_hidden_state[:, 0, :]
        cs = projection_matrix(concept.T)
        text_embeddings = torch.cat([npe, pe])
        rescaled, keep = safree_projection(text_embeddings, masked, ms, cs, alpha, text_embeddings.shape[1])
        pooled = torch.cat([npooled, pooled])
        pipe.scheduler.set_timesteps(steps)
        used = []
        for t in pipe.scheduler.timesteps:
            model_input = torch.cat([latents] * 2)
            used.append(rescaled)
            out = pipe.transformer(hidden_states=model_input, timestep=t.expand(2), encoder_hidden_states=rescaled,
                                   pooled_projections=pooled, return_dict=False)[0]  # fmt: skip
            uncond, cond = out.chunk(2)
            latents = pipe.scheduler.step(uncond + guidance_scale * (cond - uncond), t, latents, return_dict=False)[0]
    return dict(latents=latents, embeddings=used, keep=keep)
