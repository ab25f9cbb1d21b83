"""Samplers with k-diffusion's signature, and the edit-friendly inversion that records their noise.

``sample_x(model, x, sigmas, extra_args, callback, disable, noise_sampler)`` as in k-diffusion's
``sampling.py`` (Crowson): `model(x, sigma, **extra_args)` is a *denoiser*, returning the data
prediction x̂_0 for latents `x` at noise level `sigma` (one per sample); `sigmas` is the schedule,
noisiest first; `noise_sampler(sigma, sigma_next)` gives the noise of a stochastic step. One
difference: `x` is the model's own latent, x_t = α_t x_0 + σ_t ε, not k-diffusion's x_0 + σ ε, so
the same code serves variance-preserving models (Stable Diffusion, SDXL, PixArt: `sigmas` are
k-diffusion's σ = √((1 − ᾱ)/ᾱ), :data:`VP`) and flow-matching models (SD3, FLUX, Qwen-Image: `sigmas`
are the flow's σ with x_t = (1 − σ) x_0 + σ ε, :data:`FLOW`) — a `coefficients` function turns σ into
(α_t, σ_t). Nothing here knows about pipelines or devices, and every function takes latents of any
shape (batch, channels, *spatial).

* :func:`sample_dpmpp_2m_sde`: the second-order multistep SDE-DPM-Solver++ (Lu et al., 2022, "DPM-Solver++",
  §4 and App. B; midpoint variant, first order on the first step), the solver LEDITS++ (Brack et al.,
  CVPR 2024, §3.1) edits with.
* :func:`invert_dpmpp_2m_sde`: the edit-friendly inversion of Huberman-Spiegelglas et al. (CVPR 2024)
  with that solver: given an auxiliary sequence x_t = α_t x_0 + σ_t ε_t with independent noise per step,
  the noise maps z_t = (x_{t−1} − μ_t) / s_t that make every solver step land on the next element.
* :class:`ReplayNoise`: a noise sampler that replays those maps, so that :func:`sample_dpmpp_2m_sde`
  from x_T reconstructs x_0 (or, with a guided denoiser, edits it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Coefficients = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """`x` with singleton dimensions appended until it has `target_dims` dimensions (k-diffusion's helper)."""
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"a tensor of {x.ndim} dimensions cannot be broadcast to {target_dims}")
    return x.reshape(*x.shape, *([1] * missing))


# -- noise schedules --------------------------------------------------------------------------------


def VP(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α_t, σ_t) of the variance-preserving process at k-diffusion's noise level σ: α = 1/√(1 + σ²), σ_t = σ·α."""
    alpha = 1.0 / torch.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def FLOW(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α_t, σ_t) of rectified flow (Liu et al., 2023; Esser et al., 2024) at its noise level σ: (1 − σ, σ)."""
    return 1.0 - sigma, sigma


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ_t = √((1 − ᾱ_t) / ᾱ_t) for every training timestep t of a DDPM schedule (k-diffusion's noise levels)."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def half_log_snr(sigma: torch.Tensor, coefficients: Coefficients = VP) -> torch.Tensor:
    """λ = log α_t − log σ_t, the time variable of DPM-Solver (−∞ where α = 0, pure noise)."""
    alpha, sigma_t = coefficients(sigma)
    return torch.log(alpha) - torch.log(sigma_t)


def noised(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, coefficients: Coefficients = VP) -> torch.Tensor:
    """x_t = α_t x_0 + σ_t ε."""
    alpha, sigma_t = coefficients(sigma)
    return alpha * x0 + sigma_t * noise


def denoised(
    x: torch.Tensor,
    model_output: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str = "epsilon",
    coefficients: Coefficients = VP,
) -> torch.Tensor:
    """The data prediction x̂_0 from a model predicting ε, v (v = α ε − σ x_0, variance preserving), x_0
    ("sample") or the flow velocity v = ε − x_0 ("flow"); `sigma` broadcasts against `x`."""
    alpha, sigma_t = coefficients(sigma)
    if prediction_type == "epsilon":
        return (x - sigma_t * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * x - sigma_t * model_output
    if prediction_type == "sample":
        return model_output
    if prediction_type == "flow":
        return x - sigma_t * model_output  # x_t = x_0 + σ (ε − x_0) since α + σ = 1
    raise ValueError(f"unsupported prediction type {prediction_type!r} (epsilon, v_prediction, sample or flow)")


# -- one step of SDE-DPM-Solver++(2M) -------------------------------------------------------------


def dpmpp_2m_sde_mean(
    x: torch.Tensor,
    x0_pred: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    x0_pred_prev: torch.Tensor | None = None,
    sigma_prev: torch.Tensor | None = None,
    *,
    eta: float = 1.0,
    coefficients: Coefficients = VP,
) -> torch.Tensor:
    """The deterministic part μ of one SDE-DPM-Solver++ step from σ to σ_next.

    With h = λ_next − λ: μ = (σ_t,next/σ_t)·e^{−ηh}·x + α_next (1 − e^{−(1+η)h}) D, where D = x̂_0
    (first order) or, given the previous step's x̂_0, the multistep midpoint estimate
    D = x̂_0 + (x̂_0 − x̂_0,prev)/(2r) with r = h_prev / h (second order, "2M"). η = 1 is the SDE solver
    (DPM-Solver++ App. B), η = 0 the ODE one. σ_next = 0 is a deterministic last step: μ = x̂_0.
    """
    if float(sigma_next) == 0.0:
        return x0_pred
    lam = half_log_snr(sigma, coefficients)
    alpha_next, sigma_t_next = coefficients(sigma_next)
    _, sigma_t = coefficients(sigma)
    h = half_log_snr(sigma_next, coefficients) - lam
    d = x0_pred
    if x0_pred_prev is not None:
        r = (lam - half_log_snr(sigma_prev, coefficients)) / h
        d = x0_pred + 0.5 * (1.0 / r) * (x0_pred - x0_pred_prev)
    return (sigma_t_next / sigma_t * torch.exp(-eta * h)) * x + (alpha_next * (1 - torch.exp(-(1.0 + eta) * h))) * d


def dpmpp_2m_sde_noise_scale(
    sigma: torch.Tensor, sigma_next: torch.Tensor, *, eta: float = 1.0, coefficients: Coefficients = VP
) -> torch.Tensor:
    """s, the scale of the step's noise: σ_t,next · √(1 − e^{−2ηh}) (0 for a last step to σ = 0)."""
    if float(sigma_next) == 0.0 or eta == 0.0:
        return torch.zeros_like(sigma)
    _, sigma_t_next = coefficients(sigma_next)
    h = half_log_snr(sigma_next, coefficients) - half_log_snr(sigma, coefficients)
    return sigma_t_next * torch.sqrt(1.0 - torch.exp(-2.0 * eta * h))


def noise_map(x_next: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """z = (x_{t−1} − μ) / s: the noise that makes the step land on x_{t−1}; zeros where s = 0."""
    if float(scale) == 0.0:
        return torch.zeros_like(x_next)
    return (x_next - mean) / scale


def sde_step(mean: torch.Tensor, scale: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """x_{t−1} = μ + s·z: one stochastic solver step with a given noise sample."""
    return mean + scale * z


# -- noise samplers -------------------------------------------------------------------------------


class ReplayNoise:
    """A noise sampler that gives, for the step from ``sigmas[i]``, the recorded map ``noise_maps[i]``.

    `noise_maps` (steps, *latent) and `sigmas` (steps + 1,) as :func:`invert_dpmpp_2m_sde` returns and
    takes them; a step whose σ is not in the schedule is an error, not fresh noise.
    """

    def __init__(self, noise_maps: torch.Tensor, sigmas: torch.Tensor):
        if len(sigmas) != len(noise_maps) + 1:
            raise ValueError(f"{len(noise_maps)} noise maps need {len(noise_maps) + 1} noise levels, got {len(sigmas)}")
        self.noise_maps = noise_maps
        self._index = {float(s): i for i, s in enumerate(sigmas[:-1])}

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        i = self._index.get(float(sigma.flatten()[0]))
        if i is None:
            raise ValueError(f"no recorded noise map for the step from sigma={float(sigma.flatten()[0])}")
        return self.noise_maps[i]


def default_noise_sampler(x: torch.Tensor, generator: torch.Generator | None = None) -> Callable:
    """Fresh Gaussian noise shaped like `x` at every step (k-diffusion's default)."""

    def sample(sigma, sigma_next):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)

    return sample


# -- the sampler and its inversion ----------------------------------------------------------------


def sample_dpmpp_2m_sde(
    model: Callable,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool | None = None,
    noise_sampler: Callable | None = None,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    coefficients: Coefficients = VP,
) -> torch.Tensor:
    """Denoise `x` (at ``sigmas[0]``) along `sigmas` with SDE-DPM-Solver++(2M), midpoint, first order on
    the first step; a last σ of 0 makes the last step deterministic (x̂_0).

    `callback` gets k-diffusion's ``{"x", "i", "sigma", "sigma_hat", "denoised"}`` after each model
    evaluation. `disable` is accepted for k-diffusion's signature; nothing here draws a progress bar.
    """
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    per_sample = x.new_ones([x.shape[0]])
    prev = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0_pred = model(x, sigma * per_sample, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": x0_pred})
        history = (prev, sigmas[i - 1]) if prev is not None else ()
        mean = dpmpp_2m_sde_mean(x, x0_pred, sigma, sigma_next, *history, eta=eta, coefficients=coefficients)
        scale = dpmpp_2m_sde_noise_scale(sigma, sigma_next, eta=eta, coefficients=coefficients)
        if float(scale) == 0.0:
            x = mean
        else:
            x = sde_step(mean, scale * s_noise, noise_sampler(sigma, sigma_next))
        prev = x0_pred
    return x


def invert_dpmpp_2m_sde(
    model: Callable,
    xs: Sequence[torch.Tensor],
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool | None = None,
    *,
    coefficients: Coefficients = VP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Edit-friendly inversion (Huberman-Spiegelglas et al., CVPR 2024, eq. 6) for :func:`sample_dpmpp_2m_sde`.

    `xs`: the auxiliary sequence, ``xs[i]`` at ``sigmas[i]`` (drawn with independent noise per step) and
    ``xs[-1]`` the target the last step must reach. Returns (noise maps, shape (steps, *x.shape), and x_T
    = ``xs[0]``): sampling from x_T with ``ReplayNoise(noise_maps, sigmas)`` retraces the sequence. Each
    step's model input is the previous step's landing point μ + s·z as the sampler computes it, so no
    rounding error accumulates between inversion and sampling.
    """
    extra_args = {} if extra_args is None else extra_args
    steps = len(sigmas) - 1
    if len(xs) != steps + 1:
        raise ValueError(f"{steps} steps need an auxiliary sequence of {steps + 1} latents, got {len(xs)}")
    per_sample = xs[0].new_ones([xs[0].shape[0]])
    maps = []
    x, prev = xs[0], None
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0_pred = model(x, sigma * per_sample, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": x0_pred})
        history = (prev, sigmas[i - 1]) if prev is not None else ()
        mean = dpmpp_2m_sde_mean(x, x0_pred, sigma, sigma_next, *history, coefficients=coefficients)
        scale = dpmpp_2m_sde_noise_scale(sigma, sigma_next, coefficients=coefficients)
        z = noise_map(xs[i + 1], mean, scale)
        maps.append(z)
        x = mean if float(scale) == 0.0 else sde_step(mean, scale, z)
        prev = x0_pred
    return torch.stack(maps), xs[0]
