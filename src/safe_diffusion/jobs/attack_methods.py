"""What :func:`~safe_diffusion.jobs.attack.attack_run` does per row: the attacked target as the job sees it
(:class:`Target`: generation, guided or by the unguided reference; judging; an image's latents), and one runner
per method, each a thin loop over the library's optimisation (:mod:`safe_diffusion.attacks`) that says when
a row's search ends and what it found (:class:`Outcome`). The checks that refuse a target a method cannot
attack run before the job writes anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..common.errors import InputError
from ..common.outputs import png_bytes


@dataclass
class Outcome:
    prompt: str  # the adversarial prompt (the original when not attacked)
    image: Any
    unsafe: bool
    iterations: int = 0
    details: dict = field(default_factory=dict)


class Target:
    """The attacked target as the job sees it: generation (guided, or the unguided reference), judging, and
    the row's latents of an image."""

    def __init__(self, pipe, reference, mitigation, judges, steps, guidance_scale, height, width, clip):
        self.pipe, self.reference, self.mitigation, self.judges = pipe, reference, mitigation, judges
        self.steps, self.guidance_scale, self.clip = steps, guidance_scale, clip
        self.size = {"height": height, "width": width} if height else {}
        self.terms = mitigation.terms()
        self.guided = bool(self.terms) or mitigation.negative_prompt is not None
        self.concept = None  # Ring-A-Bell's concept vector, computed once per run
        self._clip_text = None

    @property
    def clip_text(self):
        """The CLIP text encoder the text attacks search (:func:`safe_diffusion.attacks.clip_text_model`)."""
        from ..attacks import clip_text_model

        if self._clip_text is None:
            self._clip_text = clip_text_model(self.pipe.text_encoder)
        return self._clip_text

    def scale(self, prompt) -> float:
        from ..evals.config import DEFAULT_GUIDANCE_SCALE

        if self.guidance_scale is not None:
            return self.guidance_scale
        return prompt.guidance or DEFAULT_GUIDANCE_SCALE

    def generate(self, prompt, text: str, guided: bool = True):
        """The image of `text` with the row's seed and scale: by the target (its guidance included), or by the
        reference without guidance."""
        return self._images([prompt], [text], guided)[0]

    def generate_many(self, prompts: list, texts: list[str]) -> list:
        """The target's images of `texts`, each with its row's seed, in one pipeline call (the rows share their
        guidance scale, as a batch does). In float32 a batch rounds differently from one image at a time."""
        return self._images(prompts, texts, True)

    def _images(self, prompts: list, texts: list[str], guided: bool) -> list:
        import torch

        from ..engine import guide

        one = len(prompts) == 1
        seeds = [torch.Generator("cpu").manual_seed(p.seed) for p in prompts]
        text = texts[0] if one else list(texts)
        call = dict(num_inference_steps=self.steps, guidance_scale=self.scale(prompts[0]), **self.size)
        call["generator"] = seeds[0] if one else seeds
        if not guided:
            return self.reference(text, **call).images
        negative = self.mitigation.negative_prompt
        if negative is not None:
            call["negative_prompt"] = negative if one else [negative] * len(prompts)
        if self.terms:
            with guide(self.pipe, *self.terms, strict=True):
                return self.pipe(text, **call).images
        return self.pipe(text, **call).images

    def unsafe(self, image) -> bool:
        data = png_bytes(image)  # judged as the file it is stored as, as eval run's images are
        verdicts = [j.judge_images([j.decode(data)])[0] for j in self.judges]
        return any(bool(v.unsafe) for v in verdicts)

    def latents(self, image, generator=None, unit_range: bool = False):
        """The VAE latents of `image` (shifted and scaled as the pipeline decodes them): the distribution's mean,
        or a draw from it with `generator`.
        `unit_range`: encode the pixels in [0, 1] rather than the VAE's [-1, 1] (P4D's official code does)."""
        import torch

        pipe = self.pipe
        with torch.no_grad():
            pixels = pipe.image_processor.preprocess(image).to(pipe.device, pipe.vae.dtype)
            if unit_range:
                pixels = (pixels + 1) / 2
            dist = pipe.vae.encode(pixels).latent_dist
            x0 = dist.mean if generator is None else dist.sample(generator)
            shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0  # SD 3 decodes z / scale + shift
            return (x0 - shift) * pipe.vae.config.scaling_factor

    def victim(self, prompt):
        from ..attacks.unlearndiffatk import victim_of

        return victim_of(
            self.pipe,
            self.terms,
            guidance_scale=self.scale(prompt),
            steps=self.steps,
            negative_prompt=self.mitigation.negative_prompt,
        )


def batches(prompts: list, size: int, key) -> list[list]:
    """Consecutive runs of at most `size` prompts with the same `key` (the guidance scale the victim uses)."""
    out: list[list] = []
    for prompt in prompts:
        if out and len(out[-1]) < size and key(out[-1][0]) == key(prompt):
            out[-1].append(prompt)
        else:
            out.append([prompt])
    return out


def run_unlearndiffatk(target: Target, prompts: list, settings, done) -> None:
    """``TextGrad.run`` for `prompts` (one batch, one guidance scale): after each timestep's steps, each prompt
    still attacked has its argmax prompt generated (the batch's in one pipeline call) and judged; its first
    unsafe image ends its search. `done(i, outcome)` is called as each prompt's search ends."""
    import torch

    from ..attacks.unlearndiffatk import UnlearnDiffAtk

    x0 = torch.cat([target.latents(target.generate(p, p.text, guided=False)) for p in prompts])
    victim = target.victim(prompts[0])
    generators = [torch.Generator().manual_seed(p.seed) for p in prompts]
    attack = UnlearnDiffAtk(target.pipe, victim, [p.text for p in prompts], x0, settings, generator=generators)
    outcomes = [Outcome(p.text, None, False) for p in prompts]
    losses: list[list[float]] = [[] for _ in prompts]
    active, visited = list(range(len(prompts))), 0

    def end(i: int) -> None:
        outcomes[i].iterations = visited * settings.iterations
        outcomes[i].details = {"timesteps_visited": visited, "mean_loss_per_timestep": losses[i]}
        done(i, outcomes[i])

    try:
        for t in attack.timesteps:
            totals = [0.0] * len(prompts)
            for _ in range(settings.iterations):
                attack.step(t)
                totals = [a + b for a, b in zip(totals, attack.last_losses)]
            visited += 1
            texts = [attack.prompt(i) for i in active]  # the active prompts' images in one pipeline call
            images = target.generate_many([prompts[i] for i in active], texts)
            for i, text, image in zip(list(active), texts, images):
                losses[i].append(totals[i] / settings.iterations)
                outcome = outcomes[i]
                outcome.prompt, outcome.image = text, image
                outcome.unsafe = target.unsafe(image)
                if outcome.unsafe:
                    active.remove(i)
                    end(i)
            if not active:
                break
    finally:
        victim.denoiser.close()
    for i in active:
        end(i)


def run_p4d(target: Target, prompts: list, settings, done) -> None:
    """``optimize`` for `prompts` (one batch, one guidance scale): every ``eval_every`` steps each prompt's
    projected prompt is generated by the target and the one whose image is closest in CLIP to its target image
    is kept; that prompt is generated and judged at the end. `done(i, outcome)` is called for each prompt."""
    import torch

    from ..attacks.p4d import P4D, clip_similarity, unconstrained_of

    generators = [torch.Generator().manual_seed(p.seed) for p in prompts]
    references = [target.generate(p, p.text, guided=False) for p in prompts]
    # as the official code: ToTensor, no [-1, 1]; each row's VAE draw from its own generator
    x0 = torch.cat([target.latents(r, g, unit_range=True) for r, g in zip(references, generators)])
    texts, scale = [p.text for p in prompts], target.scale(prompts[0])
    if settings.victim == "official":  # the official loss: its own SLD (or CFG), against the unguided prediction
        victim = official_victim(target, prompts[0])
        free = unconstrained_of(target.reference, texts, scale, guided=False)
    else:
        victim = target.victim(prompts[0])
        free = unconstrained_of(target.reference, texts, scale, guided=target.guided)
    attack = P4D(target.pipe, victim, free, texts, x0, settings, generator=generators)
    losses: list[list[float]] = [[] for _ in prompts]
    similarities: list[list[float]] = [[] for _ in prompts]
    best = [(float("-inf"), p.text) for p in prompts]
    try:
        for step in range(settings.iterations):
            attack.step()
            for i, loss in enumerate(attack.last_losses):
                losses[i].append(loss)
            if step % settings.eval_every == 0:  # the batch's projected prompts generated in one call
                texts = [attack.prompt(i) for i in range(len(prompts))]
                for i, image in enumerate(target.generate_many(prompts, texts)):
                    similarity = clip_similarity(target.clip.model, target.clip.processor, [references[i]], [image])
                    similarities[i].append(similarity)
                    if similarity > best[i][0]:
                        best[i] = (similarity, texts[i])
    finally:
        victim.denoiser.close()
        free.denoiser.close()
    for i, prompt in enumerate(prompts):
        similarity, text = best[i]
        image = target.generate(prompt, text)
        details = {"losses": losses[i], "clip_similarities": similarities[i], "best_clip_similarity": similarity}
        done(i, Outcome(text, image, target.unsafe(image), settings.iterations, details))


#: The pipelines each denoiser attack is defined for: the papers' setting (CLIP text encoders, a U-Net with ε or
#: v), SDXL and SD 3 (the tokens through both CLIP text encoders, SD 3's T5 reading their text; SD 3's loss on
#: the flow velocity: this project's definition). The text attacks take any pipeline with a CLIP text encoder
#: (:data:`safe_diffusion.attacks.CLIP_TEXT_ENCODERS`).
DENOISER_FAMILIES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline")
ATTACKED_PIPELINES = {"unlearndiffatk": DENOISER_FAMILIES, "p4d-n": DENOISER_FAMILIES, "p4d-k": DENOISER_FAMILIES}
FAMILY_NAMES = {
    "StableDiffusionPipeline": "SD 1.x/2.x",
    "StableDiffusionXLPipeline": "SDXL",
    "StableDiffusion3Pipeline": "SD 3",
}


def check_family(method: str, model, index: dict) -> str | None:
    """Refuse, from the checkpoint's ``model_index.json`` (`index`) before anything loads, a pipeline `method` is
    not defined for; return its family (None: no index, e.g. a hub id resolved later)."""
    from ..attacks import CLIP_TEXT_ENCODERS, TEXT_ATTACKS

    family = index.get("_class_name")
    if family is None:
        return None
    if method in TEXT_ATTACKS:  # model-agnostic: any pipeline with a CLIP text encoder
        encoder = (index.get("text_encoder") or [None, None])[-1]
        if encoder not in CLIP_TEXT_ENCODERS:
            raise InputError(
                f"attack {method} searches a CLIP text encoder ({', '.join(CLIP_TEXT_ENCODERS)});"
                f" {model!r} is a {family} whose text_encoder is {encoder or 'absent'}"
            )
    elif family not in ATTACKED_PIPELINES[method]:
        names = [FAMILY_NAMES[f] for f in ATTACKED_PIPELINES[method]]
        where = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
        raise InputError(
            f"attack {method} is defined for {where} ({', '.join(ATTACKED_PIPELINES[method])}); {model!r} is a"
            f" {family} (ring-a-bell and mma, which search the text encoder alone, run against SDXL, SD 3 and FLUX too)"
        )
    return family


def family_deviations(method: str, family: str | None, index: dict | None = None) -> list[str]:
    """What a denoiser attack is on a family beyond the papers' (no official code there: this project's
    definition), recorded among the run's deviations; `index`: the checkpoint's ``model_index.json``."""
    if family == "StableDiffusionXLPipeline":
        if method == "unlearndiffatk":
            return [
                "SDXL: no official code; one token distribution through both text encoders, each with its own"
                " token table, the conditioning as SDXL's encode_prompt makes it (this project's definition)"
            ]
        return [
            "SDXL: no official code; the soft prompt in both text encoders' token tables side by side,"
            " projected to the token nearest in the joint table, each encoder given its part, the conditioning"
            " as SDXL's encode_prompt makes it (this project's definition)"
        ]
    if family == "StableDiffusion3Pipeline":
        t5 = (dict(index or {}).get("text_encoder_3") or [None, None])[-1] is not None
        return [
            "SD 3: no official code; the tokens through both CLIP text encoders as on SDXL, the conditioning as SD"
            " 3's encode_prompt makes it, x_t = (1 - sigma) x0 + sigma noise at the scheduler's shifted training"
            " sigma of t, the loss on the flow velocity noise - x0 (UnlearnDiffAtk) or against the unconstrained"
            " model's velocity (P4D) (this project's definition)"
            + (
                "; T5 (no vocabulary shared with CLIP) encodes the text of the current tokens, without gradient: the"
                " gradient reaches the CLIP encoders only"
                if t5
                else "; without T5, its rows are zeros as the pipeline makes them"
            )
        ]
    return []


def check_denoiser_victim(method: str, mitigation) -> None:
    """Refuse, before anything is written, a target whose method filters the prompt's text (a call hook, SAFREE)
    when the attack optimises embeddings against its denoiser: such a target has no text to filter there."""
    if method in ("ring-a-bell", "mma"):
        return  # text attacks: the target only generates the final images, through guide()
    from ..engine.hooks import is_call_hook_term

    hooked = [type(t).__name__ for t in mitigation.terms() if is_call_hook_term(t)]
    if hooked:
        raise InputError(
            f"attack {method} optimises embeddings against the target's denoiser, and {hooked[0]} filters a prompt's"
            " text, so it cannot be that target: attack it with --method ring-a-bell or mma, or run eval run"
            " --mitigation on the prompts an attack exported (attack export)"
        )


def check_official_victim(mitigation, family: str | None = None) -> None:
    """P4D's official loss exists for SD 1.x/2.x with SLD, a negative prompt or no guidance; anything else is
    refused."""
    from ..guidance.terms import SafetyGuidance

    if family not in (None, "StableDiffusionPipeline"):
        raise InputError(
            f"--victim official reproduces P4D's own loss, written for SD 1.x/2.x's U-Net; {family} needs --victim engine"
        )
    terms = mitigation.terms()
    if len(terms) > 1 or (terms and not isinstance(terms[0], SafetyGuidance)):
        raise InputError(
            "--victim official reproduces P4D's own loss, defined for SLD, a negative prompt or no guidance; "
            f"{mitigation.label} needs --victim engine"
        )


def official_victim(target: Target, prompt):
    """The victim of P4D's official loss for the target: its SLD variant, or CFG from the negative prompt (the
    engine's, the same formula), or the conditional prediction."""
    from ..attacks.p4d import OfficialSldVictim

    if target.terms:
        victim = OfficialSldVictim(target.pipe, target.terms[0], target.scale(prompt))
        victim.denoiser = victim  # type: ignore[attr-defined]  # closed as the engine's victims are
        return victim
    return target.victim(prompt)


def run_ring_a_bell(target: Target, prompt, settings) -> Outcome:
    """The genetic search on the target's text encoder; the found prompt is generated and judged once."""
    from ..attacks.ring_a_bell import attack_prompt, concept_vector

    encoder, tokenizer = target.clip_text, target.pipe.tokenizer
    if target.concept is None:
        target.concept = concept_vector(encoder, tokenizer, settings.concept, settings.samples)
    text, losses = attack_prompt(encoder, tokenizer, prompt.text, target.concept, settings, prompt.seed)
    image = target.generate(prompt, text)
    return Outcome(text, image, target.unsafe(image), settings.generations, {"best_loss_per_generation": losses})


def run_mma(target: Target, prompt, settings) -> Outcome:
    """The token search on the target's text encoder toward the prompt's pooled embedding; the best control
    found is generated and judged once."""
    import torch

    from ..attacks.mma import MMA

    search = MMA(
        target.clip_text,
        target.pipe.tokenizer,
        prompt.text,
        settings,
        generator=torch.Generator().manual_seed(prompt.seed),
    )
    losses = search.run()
    image = target.generate(prompt, search.best)
    return Outcome(
        search.best, image, target.unsafe(image), settings.iterations, {"losses": losses, "best_loss": search.best_loss}
    )


#: The per-prompt runner of the text attacks.
RUNNERS = {"ring-a-bell": run_ring_a_bell, "mma": run_mma}
#: The runner of each denoiser attack, given a batch of prompts with one guidance scale (``--batch-size``).
BATCHED = {"unlearndiffatk": run_unlearndiffatk, "p4d-n": run_p4d, "p4d-k": run_p4d}
