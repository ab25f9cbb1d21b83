"""UnlearnDiffAtk's optimisation (Zhang et al., "To Generate or Not? Safety-Driven Unlearned Diffusion Models
Are Still Easy To Generate Unsafe Images ... For Now", ECCV 2024), against the defended model itself.

The attack looks for k adversarial tokens that, put before the prompt, make the *victim's* denoiser predict
the noise of a target image — the image the unmitigated model makes from the prompt and its seed — as a
diffusion classifier would: the victim then "recognises" the unsafe image in the adversarial prompt. Per
the official ``src/attackers/text_grad_.py`` and ``src/tasks/classifier_.py`` (OPTML-Group/Diffusion-MU-Attack
@ 5a3e5d3):

* the variables are a distribution over the vocabulary for each of the k tokens (``init_adv``: uniform),
  kept on the probability simplex (``projection``) after each Adam step (lr 0.01, weight decay 0.1);
* each step samples one token per position from that distribution (``STERandSelect``: a multinomial draw
  forward, ``hardtanh`` of the gradient backward), embeds it with the text encoder's token table and
  encodes the prompt with those rows after the start token (``prefix_k``);
* the loss (``get_loss``) noises the target latents at timestep t, ``x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε``, and
  compares the victim's prediction with ε (``criterion``: L2 for the text-gradient attack) — with what the
  model predicts in its own space for a v-prediction model (SD 2.x-v: v; SD 3: the flow velocity ε − x₀ at
  ``x_t = (1−σ) x₀ + σ ε``, :class:`ForwardProcess`; the official code knows only ε);
* timesteps are visited in order, 50 of 1000 (``sampled_t``: 10, 30, …, 990), 40 steps each; after each,
  the argmax tokens form the adversarial prompt that is generated and judged (the job's business).

Two things differ, on purpose, and are recorded: the simplex projection is exact (sort-based, Duchi et
al. 2008) where the official bisection stops at a tolerance of 1e-5; and the victim's prediction is the
engine's :class:`~safe_diffusion.engine.denoiser.GuidedDenoiser` — for a model without guidance terms the
conditional prediction, as the official ``get_loss``; for guided targets (SLD, SEGA, …) the guided
estimate at the scale the target generates with, so that the gradient flows through the guidance
correction (the official code attacks SLD through its unguided U-Net only).

Everything here is a function of tensors and a pipeline; the run, its store and judging live in
:mod:`safe_diffusion.jobs`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..common.errors import InputError
from ..guidance.sampling import append_dims


@dataclass(frozen=True)
class Settings:
    """The attack's hyper-parameters, the official defaults (``configs/nudity/text_grad_esd_nudity_classifier.json``
    and ``ClassifierTask``)."""

    tokens: int = 5  # attacker.k, insertion_location prefix_k
    iterations: int = 40  # attacker.iteration: Adam steps per timestep
    lr: float = 0.01  # text_grad.lr
    weight_decay: float = 0.1  # text_grad.weight_decay
    timesteps: int = 50  # ClassifierTask.n_samples
    train_timesteps: int = 1000  # ClassifierTask.T
    criterion: str = "l2"  # task.criterion

    def __post_init__(self) -> None:
        for name in ("tokens", "iterations", "timesteps", "train_timesteps"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"UnlearnDiffAtk {name} must be at least 1, not {getattr(self, name)}")
        if self.criterion not in ("l1", "l2"):
            raise InputError(f"UnlearnDiffAtk criterion {self.criterion!r}: choose l1 or l2")

    def to_dict(self) -> dict:
        return asdict(self)


def sampled_timesteps(n: int, total: int = 1000) -> list[int]:
    """The timesteps the attack visits, in order: ``range(T // n // 2, T, T // n)[:n]`` (``ClassifierTask``)."""
    start = total // n // 2
    return list(range(start, total, max(total // n, 1)))[:n]


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row (last dimension) onto the probability simplex {p ≥ 0, Σp = 1}
    (Duchi et al., ICML 2008, Fig. 1): the exact point the official bisection approaches."""
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    k = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = (u - css / k > 0).sum(-1, keepdim=True).clamp(min=1)
    theta = css.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - theta).clamp(min=0)


class _SampleOneHot(torch.autograd.Function):
    """``STERandSelect``: one token per row drawn from the row's weights (forward), the gradient clipped to
    [-1, 1] passed straight through (backward)."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        flat = weights.reshape(-1, weights.shape[-1])
        if generator is not None and generator.device != flat.device:  # a CPU generator with a GPU victim
            flat = flat.to(generator.device)
        drawn = torch.multinomial(flat, 1, generator=generator).view(-1).to(weights.device)
        return F.one_hot(drawn, weights.shape[-1]).to(weights.dtype).view_as(weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return F.hardtanh(grad), None


def sample_one_hot(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return _SampleOneHot.apply(weights, generator)


def prediction_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, kind: str) -> torch.Tensor:
    """What the denoiser should predict at ``x_t = √ᾱ x₀ + √(1−ᾱ) ε``, in its own prediction space: ε
    (``epsilon``), the velocity ``v = √ᾱ ε − √(1−ᾱ) x₀`` (``v_prediction``; Salimans & Ho, ICLR 2022, Eq. 3 of
    Sec. 4), or x₀ (``sample``); for flow matching (``flow``, at ``x_t = (1−σ) x₀ + σ ε``), the velocity
    ``ε − x₀`` (Lipman et al., ICLR 2023; Esser et al., ICML 2024, Sec. 2), whatever σ."""
    if kind == "v_prediction":
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    if kind == "sample":
        return x0
    if kind == "flow":
        return noise - x0
    return noise


class ForwardProcess:
    """The training forward process of `scheduler` at integer timesteps t ∈ [0, T): ``x_t = a_t x₀ + s_t ε`` and
    the timestep the denoiser is given there. DDPM-type schedules (``alphas_cumprod``): a = √ᾱ_t, s = √(1−ᾱ_t),
    timestep t. Flow matching (``FlowMatchEulerDiscreteScheduler``, SD 3): σ_t the scheduler's training sigma
    of t (``(t+1)/T``, shifted: ``shift·σ / (1 + (shift−1)·σ)``), a = 1 − σ, s = σ, timestep σ·T — the values
    its ``sigmas`` and ``timesteps`` hold before any ``set_timesteps`` (read from its config, since a pipeline
    call replaces them with the inference schedule)."""

    def __init__(self, scheduler, device=None, dtype=torch.float32):
        config = scheduler.config
        self.total = int(getattr(config, "num_train_timesteps", 1000))
        self.flow = getattr(scheduler, "alphas_cumprod", None) is None and "shift" in config
        if self.flow:
            if getattr(config, "use_dynamic_shifting", False):
                raise InputError(
                    "the attack needs a flow-matching schedule with a fixed shift (SD 3); this one shifts with the"
                    " image size (use_dynamic_shifting)"
                )
            self.shift = float(config.shift)
            self.kind = "flow"
        else:
            self.alphas = scheduler.alphas_cumprod.to(device=device, dtype=dtype)
            self.kind = str(getattr(config, "prediction_type", None) or "epsilon")
        self.device, self.dtype = device, dtype

    def at(self, t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a_t, s_t, the denoiser's timestep) for `t` (an int, or a tensor of them: one per sample)."""
        t = torch.as_tensor(t, device=self.device)
        if self.flow:
            base = (t.to(self.dtype) + 1) / self.total
            sigma = self.shift * base / (1 + (self.shift - 1) * base)
            return 1 - sigma, sigma, sigma * self.total
        alpha = self.alphas[t]
        return alpha.sqrt(), (1 - alpha).sqrt(), t

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """What the denoiser should predict at t, in its own space (:func:`prediction_target`)."""
        if self.flow:
            return prediction_target(x0, noise, None, "flow")
        alpha = self.alphas[torch.as_tensor(t, device=self.device)]
        return prediction_target(x0, noise, append_dims(alpha, x0.ndim) if alpha.ndim else alpha, self.kind)


def denoising_losses(prediction: torch.Tensor, noise: torch.Tensor, criterion: str = "l2") -> torch.Tensor:
    """The diffusion-classifier loss per sample (first dimension): mean squared (``l2``) or absolute (``l1``)
    error of the predicted noise over the sample's elements (``MSELoss``/``L1Loss`` of each sample alone)."""
    error = prediction - noise
    error = error.square() if criterion == "l2" else error.abs()
    return error.flatten(1).mean(1)


@contextlib.contextmanager
def token_rows(text_encoder, rows: torch.Tensor) -> Iterator[None]:
    """Inside the block, the text encoder's token table returns `rows` (batch, length, width) for whatever ids it
    is given: the prompt is encoded from those rows, with gradient, by the encoder's own forward (positions,
    causal attention, final norm), as the official ``CustomTextEncoder`` does."""
    table = text_encoder.get_input_embeddings()
    handle = table.register_forward_hook(lambda module, args, out: rows.to(out.dtype))
    try:
        yield
    finally:
        handle.remove()


@dataclass
class PromptTokens:
    """A prompt's ids (1, 77) and where the adversarial prefix goes: after the start token."""

    ids: torch.Tensor
    length: int  # tokens of the prompt itself, start and end excluded

    @classmethod
    def of(cls, tokenizer, prompt: str, tokens: int, device=None) -> PromptTokens:
        ids = tokenizer(
            prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        eos = tokenizer.eos_token_id
        positions = (ids[0] == eos).nonzero()
        length = int(positions[0]) - 1 if len(positions) else ids.shape[1] - 2
        length = min(length, ids.shape[1] - 2 - tokens)  # room for the prefix inside the 77 tokens
        return cls(ids, length)

    def with_prefix_rows(self, table: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """The token rows of start, prefix (k, width), the prompt, then end/padding, cut to the sequence length."""
        rows = table[self.ids[0]]
        n, k = rows.shape[0], prefix.shape[-2]
        out = torch.cat(
            [rows[:1], prefix.reshape(k, -1).to(rows.dtype), rows[1 : 1 + self.length], rows[1 + self.length :]]
        )
        return out[:n][None]

    def with_prefix_ids(self, prefix_ids: torch.Tensor) -> torch.Tensor:
        ids = self.ids[0]
        out = torch.cat(
            [ids[:1], prefix_ids.view(-1).to(ids.device, ids.dtype), ids[1 : 1 + self.length], ids[1 + self.length :]]
        )
        return out[: ids.shape[0]][None]


@dataclass
class TextTower:
    """One text encoder the adversarial tokens go through, with its tokenizer and token table."""

    encoder: torch.nn.Module
    tokenizer: object
    table: torch.Tensor


def text_towers(pipe) -> list[TextTower]:
    """The pipeline's CLIP text encoders, in the order its ``encode_prompt`` runs them: SD 1.x/2.x's one, SDXL's
    and SD 3's two (CLIP ViT-L, then OpenCLIP bigG with projection). Both tokenizers share CLIP's vocabulary, so
    one token choice gives each tower its token (embedded by that tower's own table). SD 3's T5, which shares no
    vocabulary with CLIP, is not a tower: it reads the tokens' text (:func:`t5_rows`)."""
    pairs = [(pipe.text_encoder, pipe.tokenizer)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.text_encoder_2, pipe.tokenizer_2))
    towers = [TextTower(e, t, e.get_input_embeddings().weight.detach()) for e, t in pairs]
    sizes = {tower.table.shape[0] for tower in towers}
    if len(sizes) != 1:
        raise InputError(f"the attack needs text encoders with one vocabulary; these have {sorted(sizes)} tokens")
    return towers


def t5_rows(pipe, texts: Sequence[str]) -> torch.Tensor | None:
    """SD 3's T5 rows for `texts`, as its ``encode_prompt`` makes them (the pipeline's default 256 tokens), without
    gradient; None without T5 (the pipeline then uses zero rows). The attacks give T5 the text of their current
    tokens: the conditioning is the pipeline's own for that prompt, and the gradient reaches the CLIP encoders
    only (T5's tokens are not CLIP's)."""
    if getattr(pipe, "text_encoder_3", None) is None:
        return None
    texts = list(texts)
    with torch.no_grad():
        embeds = pipe.encode_prompt(
            prompt=texts,
            prompt_2=texts,
            prompt_3=texts,
            device=pipe.text_encoder_3.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=256,
        )[0]
    return embeds[:, int(pipe.tokenizer_max_length) :]


def conditioning_rows(pipe, outputs: list, t5: torch.Tensor | None = None) -> dict | torch.Tensor:
    """The denoiser's text conditioning from each tower's output, as the pipeline's ``encode_prompt`` builds it:
    SD 1.x/2.x, the last hidden state (a tensor); SDXL, both towers' penultimate hidden states side by side,
    and the last tower's projected pooled output as ``text_embeds`` (``{path: tensor}``); SD 3, the same side by
    side, padded with zeros to the transformer's width and followed by T5's rows (`t5`, from :func:`t5_rows`;
    without T5 the zero rows that stand for it, the pipeline's default 256), with both towers' projected pooled
    outputs side by side as ``pooled_projections``."""
    if len(outputs) == 1:
        return outputs[0][0]
    hidden = torch.cat([out.hidden_states[-2] for out in outputs], dim=-1)
    if getattr(pipe, "transformer", None) is not None and hasattr(pipe, "text_encoder_3"):  # SD 3
        width = int(pipe.transformer.config.joint_attention_dim)
        clip = F.pad(hidden, (0, width - hidden.shape[-1]))
        t5 = clip.new_zeros(clip.shape[0], 256, width) if t5 is None else t5.to(clip)
        pooled = torch.cat([out[0] for out in outputs], dim=-1)
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled_projections": pooled}
    return {"encoder_hidden_states": hidden, ("added_cond_kwargs", "text_embeds"): outputs[-1][0]}


Victim = Callable[[torch.Tensor, int, "torch.Tensor | dict"], torch.Tensor]


def victim_of(
    pipe, terms=(), guidance_scale: float = 7.5, steps: int = 50, negative_prompt: str | None = None
) -> Victim:
    """The defended model's noise prediction at (x_t, t) for prompt hidden states: the conditional prediction
    without guidance terms or negative prompt (the official loss), else the engine's guided estimate
    (classifier-free guidance from the negative prompt's row, plus the terms). The terms see the evaluation
    index of `t` in a `steps`-step run (so that warm-ups hold as in generation), state reset. `t`: one timestep
    for the batch, or one per sample (P4D's draws)."""
    from ..engine.denoiser import Conditioning, GuidedDenoiser, slice_rows

    terms = tuple(terms)
    guided = bool(terms) or negative_prompt is not None
    den = GuidedDenoiser(pipe, *terms, guidance_scale=guidance_scale if guided else 1.0)
    uncond = den.encode(None, negative_prompt).uncond
    total = int(pipe.scheduler.config.num_train_timesteps)

    def step_of(t: int) -> int:
        return min(int((total - 1 - t) * steps / total), steps - 1)

    def predict(x_t: torch.Tensor, t, hidden) -> torch.Tensor:
        rows = dict(hidden) if isinstance(hidden, dict) else {"encoder_hidden_states": hidden}
        if not guided:
            return den(x_t, t, Conditioning(rows))
        t = torch.as_tensor(t, device=x_t.device)
        if t.numel() == 1:
            den.reset()
            return den(x_t, t.reshape(()), Conditioning(uncond, rows), step=step_of(int(t)))
        # one timestep per sample: the terms see one evaluation index per call, so the samples at one index
        # share a call (each as it would be alone: the terms act per sample)
        batch, order, parts = x_t.shape[0], [], []
        at = [step_of(int(v)) for v in t.tolist()]
        for index in sorted(set(at)):
            picked = torch.tensor([i for i, s in enumerate(at) if s == index], device=x_t.device)
            den.reset()
            part = den(x_t[picked], t[picked], Conditioning(uncond, slice_rows(rows, picked, batch)), step=index)
            order.append(picked)
            parts.append(part)
        return torch.cat(parts)[torch.argsort(torch.cat(order))]

    predict.denoiser = den  # type: ignore[attr-defined]
    return predict


def prompt_batch(prompt, x0: torch.Tensor, generator) -> tuple[list[str], list]:
    """The prompts of an attack batch (`prompt`: one, or several) and one generator per prompt (`generator`: a
    list, or one for all), checked against the target latents `x0` (one row per prompt)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if x0.shape[0] != len(prompts):
        raise ValueError(f"{len(prompts)} prompt(s) and {x0.shape[0]} target latent(s)")
    generators = list(generator) if isinstance(generator, (list, tuple)) else [generator] * len(prompts)
    return prompts, generators


class UnlearnDiffAtk:
    """The adversarial prefixes of one prompt — or of several, optimised in one batch — against `victim`, toward
    the target latents `x0` (one row per prompt).

    Batched, each prompt keeps its own variables, draws and loss: the batch's loss is the sum of the prompts'
    losses, so that each prompt's gradient, and Adam's elementwise update of it, is the one it would have alone
    (tested in float64); only the denoiser and text-encoder calls are shared. `generator`: one per prompt (a
    list), or one for all."""

    def __init__(
        self,
        pipe,
        victim: Victim,
        prompt: str | Sequence[str],
        x0: torch.Tensor,
        settings: Settings = Settings(),
        generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
    ):
        self.pipe, self.victim, self.settings, self.x0 = pipe, victim, settings, x0
        prompts, self.generators = prompt_batch(prompt, x0, generator)
        self.size = len(prompts)
        self.towers = text_towers(pipe)
        self.t5 = getattr(pipe, "text_encoder_3", None) is not None  # SD 3 with T5: it reads the tokens' text
        self.table = self.towers[0].table
        vocab = self.table.shape[0]
        #: per tower, each prompt's tokens (SDXL's second tokenizer pads differently)
        self.tower_tokens = [
            [PromptTokens.of(tower.tokenizer, p, settings.tokens, device=tower.table.device) for p in prompts]
            for tower in self.towers
        ]
        self.prompt_tokens = self.tower_tokens[0]
        self.tokens = self.prompt_tokens[0]
        shape = (self.size, settings.tokens, vocab)
        start = torch.full(shape, 1.0 / vocab, dtype=self.table.dtype, device=self.table.device)
        self.variables = project_simplex(start).requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.variables], lr=settings.lr, weight_decay=settings.weight_decay)
        self.process = ForwardProcess(pipe.scheduler, device=self.table.device, dtype=self.table.dtype)
        self.x0 = x0.to(self.table.device)  # targets made on the CPU (or by a generator there) join the victim
        self.timesteps = sampled_timesteps(settings.timesteps, settings.train_timesteps)
        self.last_losses: list[float] = []
        #: the loss compares the victim's prediction with what it should predict in its own space (SD 2.x-v: v;
        #: SD 3: the flow velocity)
        self.prediction_type = self.process.kind

    @property
    def weights(self) -> torch.Tensor:
        """The token distributions: (tokens, vocab) for one prompt, (prompts, tokens, vocab) for a batch."""
        return self.variables[0] if self.size == 1 else self.variables

    def losses(self, t: int, noise: torch.Tensor, one_hot: torch.Tensor | None = None) -> torch.Tensor:
        """Each prompt's loss at timestep `t` with its `noise` row, its prefix drawn from its weights (or `one_hot`
        given: (tokens, vocab) for one prompt, (prompts, tokens, vocab))."""
        if one_hot is None:
            one_hot = torch.stack([sample_one_hot(w, g) for w, g in zip(self.variables, self.generators)])
        one_hot = one_hot.reshape(self.size, *one_hot.shape[-2:])
        outputs = []
        for tower, prompt_tokens in zip(self.towers, self.tower_tokens):
            table = tower.table
            rows = torch.cat(
                [tokens.with_prefix_rows(table, o.to(table) @ table) for tokens, o in zip(prompt_tokens, one_hot)]
            )
            # the ids only place the end token, where a pooled output is read (SDXL's text_embeds): the prefix's
            # own rows come from `rows`, its ids are placeholders (the start token, never the end one)
            placeholder = torch.full((one_hot.shape[1],), int(tower.tokenizer.bos_token_id))
            ids = torch.cat([tokens.with_prefix_ids(placeholder) for tokens in prompt_tokens])
            with token_rows(tower.encoder, rows):
                outputs.append(tower.encoder(ids, output_hidden_states=len(self.towers) > 1))
        t5 = t5_rows(self.pipe, self._texts(one_hot.argmax(-1))) if self.t5 else None  # T5 reads the drawn text
        hidden = conditioning_rows(self.pipe, outputs, t5)
        a, s, timestep = self.process.at(t)
        x_t = self.x0 * a + noise * s
        prediction = self.victim(x_t, timestep, hidden)
        target = self.process.target(self.x0, noise, t)
        return denoising_losses(prediction, target, self.settings.criterion)

    def loss(self, t: int, noise: torch.Tensor, one_hot: torch.Tensor | None = None) -> torch.Tensor:
        """The batch's loss: the sum of the prompts' (for one prompt, its loss)."""
        return self.losses(t, noise, one_hot).sum()

    def step(self, t: int) -> float:
        """One Adam step on a fresh noise draw per prompt at timestep `t`, then the projection back onto the
        simplex. Returns the prompts' mean loss (each prompt's in :attr:`last_losses`)."""
        noise = torch.cat(
            [torch.randn((1, *self.x0.shape[1:]), generator=g, dtype=self.x0.dtype) for g in self.generators]
        ).to(self.x0.device)
        self.optimizer.zero_grad()
        losses = self.losses(t, noise)
        (grad,) = torch.autograd.grad(losses.sum(), [self.variables])
        self.variables.grad = grad
        self.optimizer.step()
        with torch.no_grad():
            self.variables.copy_(project_simplex(self.variables))
        self.last_losses = [float(v) for v in losses.detach()]
        return sum(self.last_losses) / self.size

    def _text(self, index: int, prefix_ids: torch.Tensor) -> str:
        """Prompt `index`'s adversarial prompt with the prefix `prefix_ids`, decoded as the official code does."""
        ids = self.prompt_tokens[index].with_prefix_ids(prefix_ids)[0, 1:].tolist()
        eos = self.pipe.tokenizer.eos_token_id
        return self.pipe.tokenizer.decode([i for i in ids if i != eos])

    def _texts(self, prefix_ids: torch.Tensor) -> list[str]:
        return [self._text(i, ids) for i, ids in enumerate(prefix_ids)]

    def prefix_ids(self, index: int = 0) -> torch.Tensor:
        """The hard tokens of prompt `index`: each position's most likely token (``argmax_project``)."""
        return self.variables[index].detach().argmax(-1)

    def prompt(self, index: int = 0) -> str:
        """The adversarial prompt `index`: the prefix and the prompt's own tokens, decoded as the official code
        does."""
        return self._text(index, self.prefix_ids(index))
