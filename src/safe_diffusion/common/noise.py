"""Initial noise by name: ``--noise cpu|cuda``, the generator a run's latents are drawn from.

``cpu`` is ``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))``, what diffusers draws
with a CPU generator and what every run here used before there was a choice. ``cuda`` is what
``torch.randn(shape, device="cuda")`` draws right after ``torch.cuda.manual_seed(seed)`` (or from a fresh
``torch.Generator("cuda").manual_seed(seed)``), as RECE's ``execs/generate_images.py`` seeds each image. It
is computed here on any device, from the algorithm, so a run that follows such a script does not need a GPU
to start from the paper's noise, and its images do not depend on the GPU it runs on.

How torch draws normal numbers on CUDA (``aten/src/ATen/native/cuda/DistributionTemplates.h``,
``calc_execution_policy`` and ``distribution_nullary_kernel``; cuRAND's ``curand_kernel.h``):

* thread ``i`` of a grid of ``T`` threads (blocks of 256; ``T`` covers the whole tensor up to the GPU's
  resident-thread limit) runs ``curand_init(seed, subsequence=i, offset=0)``: Philox4x32-10 with key
  ``(seed mod 2**32, seed >> 32)`` and counter ``(call, 0, i, 0)``;
* each call of ``curand_normal4`` turns one Philox block ``(x0, x1, x2, x3)`` into four normals by
  Box–Muller: ``sqrt(-2 ln u)·(sin v, cos v)`` with ``u = x0·2⁻³² + 2⁻³³``, ``v = (x1·2⁻³² + 2⁻³³)·2π``,
  then the same for ``(x2, x3)``;
* element ``j`` of the output is number ``(j mod 4T) // T`` of thread ``j mod T``'s call ``j // 4T``.

For a tensor of at most T elements (an SD latent of 512×512 or 768×768 on any GPU since Kepler) each
element is thread j's first number. cuRAND's ``__sincosf`` and ``logf`` are single-precision approximations;
here they are computed in double precision and rounded, so the two agree to a few float32 ulps, not to the
bit (:func:`cuda_randn`'s test compares with the GPU where one is present).
"""

from __future__ import annotations

import math

import numpy as np

CPU, CUDA = "cpu", "cuda"
NOISES = {
    CPU: "torch.Generator('cpu').manual_seed(seed), torch.randn on the CPU",
    CUDA: (
        "torch.cuda.manual_seed(seed), torch.randn on the GPU: Philox4x32-10 and Box-Muller as torch's CUDA kernel"
        " draws them, computed here on the CPU (common.noise.cuda_randn)"
    ),
}

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)  # Philox4x32 multipliers (Salmon et al., SC 2011)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)  # its Weyl key increments
_MASK = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)
_TWO_POW32_INV = np.float32(2.3283064e-10)  # cuRAND's CURAND_2POW32_INV
_TWO_POW32_INV_2PI = np.float32(2.3283064e-10) * np.float32(6.2831855)  # CURAND_2POW32_INV_2PI
_BLOCK = 256  # torch's block_size_bound


def check_noise(name: str | None) -> str:
    """The canonical noise name (None: ``cpu``); anything else is refused in one line."""
    from .errors import InputError

    key = CPU if name is None else str(name).strip().lower()
    if key not in NOISES:
        raise InputError(f"--noise {name!r}: choose one of {', '.join(NOISES)}")
    return key


def philox4x32(counter: np.ndarray, key: np.ndarray, rounds: int = 10) -> np.ndarray:
    """Philox4x32 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011, §4.2) of the
    counters `counter` (4, n) under the keys `key` (2, n), all uint32 values; returns the (4, n) blocks."""
    c = [np.asarray(counter[i], dtype=np.uint64) & _MASK for i in range(4)]
    k0, k1 = (np.asarray(key[i], dtype=np.uint64) & _MASK for i in range(2))
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
        p0, p1 = _M0 * c[0], _M1 * c[2]  # exact: both factors are below 2**32
        c = [(p1 >> _SHIFT) ^ c[1] ^ k0, p1 & _MASK, (p0 >> _SHIFT) ^ c[3] ^ k1, p0 & _MASK]
    return np.stack(c).astype(np.uint32)


def _box_muller(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cuRAND's ``_curand_box_muller``: the float32 (s·sin v, s·cos v) of two uint32 arrays (u and v rounded to
    float32 after one fused multiply-add, as nvcc compiles them; ln, sqrt, sin and cos in double precision)."""

    def fma32(a: np.ndarray, scale: np.float32) -> np.ndarray:
        return (a.astype(np.float32).astype(np.float64) * float(scale) + float(scale) / 2).astype(np.float32)

    u = fma32(x, _TWO_POW32_INV).astype(np.float64)
    v = fma32(y, _TWO_POW32_INV_2PI).astype(np.float64)
    s = np.sqrt(-2.0 * np.log(u))
    return (s * np.sin(v)).astype(np.float32), (s * np.cos(v)).astype(np.float32)


def _grid_threads(n: int, threads: int | None) -> int:
    grid = -(-n // _BLOCK)
    if threads is not None:
        grid = max(1, min(grid, int(threads) // _BLOCK))
    return grid * _BLOCK


def philox_increment(n: int, threads: int | None = None) -> int:
    """How far one ``torch.randn`` of `n` elements advances a CUDA generator's Philox offset (torch's
    ``calc_execution_policy``: 4 per number a thread draws, so 4 whenever the grid covers the tensor)."""
    return ((n - 1) // (_grid_threads(n, threads) * 4) + 1) * 4


def cuda_randn(seed: int, shape: tuple[int, ...] | list[int], *, offset: int = 0, threads: int | None = None):
    """``torch.randn(shape)`` as a CUDA generator seeded with `seed` draws it on the GPU, as a float32 CPU
    tensor. `offset`: the generator's Philox offset before the draw (0 when freshly seeded; each earlier draw
    adds :func:`philox_increment`). `threads`: the kernel's grid size in threads (None: enough for one element
    each, which any GPU since Kepler has for an SD latent; give ``multiProcessorCount ×
    maxThreadsPerMultiProcessor`` for larger)."""
    import torch

    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed {seed} is outside 0..2**64-1")
    n = math.prod(int(s) for s in shape)
    if n == 0:
        return torch.zeros(tuple(shape), dtype=torch.float32)
    total = _grid_threads(n, threads)
    j = np.arange(n, dtype=np.int64)
    thread = (j % total).astype(np.uint64)
    call = (j // (4 * total)).astype(np.uint64) + np.uint64(int(offset) // 4)
    component = (j % (4 * total)) // total
    zeros = np.zeros(n, dtype=np.uint64)
    counter = np.stack([call & _MASK, call >> _SHIFT, thread & _MASK, thread >> _SHIFT])
    key = np.stack([np.full(n, seed & 0xFFFFFFFF, dtype=np.uint64), zeros + np.uint64(seed >> 32)])
    x = philox4x32(counter, key)
    s0, c0 = _box_muller(x[0], x[1])
    s1, c1 = _box_muller(x[2], x[3])
    values = np.choose(component, [s0, c0, s1, c1])
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(tuple(shape))


def latent_shape(pipe, height: int, width: int) -> tuple[int, int, int, int]:
    """The shape of one image's initial latents, for the pipelines that draw them as (1, channels, height / f,
    width / f): Stable Diffusion 1.x/2.x, XL and 3 text-to-image; any other is refused in one line."""
    from .errors import InputError

    denoiser = _denoiser(pipe)
    factor = getattr(pipe, "vae_scale_factor", None)
    name = type(pipe).__name__
    if denoiser is None or not factor or not name.startswith("StableDiffusion") or "Inpaint" in name:
        raise InputError(f"--noise cuda: supported for Stable Diffusion 1.x/2.x, XL and 3 text-to-image, not {name}")
    return (1, denoiser.config.in_channels, height // factor, width // factor)


def initial_noise(pipe, noise: str, seeds: list[int], height: int, width: int) -> dict:
    """The pipeline call's noise argument for images of `height` × `width` with `seeds`: a CPU generator per
    image (``cpu``), or the latents a CUDA generator seeded with each seed draws (``cuda``, :func:`cuda_randn`),
    on the denoiser's device and in its dtype."""
    import torch

    if noise == CPU:
        return {"generator": [torch.Generator("cpu").manual_seed(seed) for seed in seeds]}
    shape = latent_shape(pipe, height, width)
    latents = torch.cat([cuda_randn(seed, shape) for seed in seeds])
    return {"latents": _on_denoiser(pipe, latents)}


def _denoiser(pipe):
    return getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)


def _on_denoiser(pipe, latents):
    denoiser = _denoiser(pipe)
    return latents.to(device=denoiser.device, dtype=denoiser.dtype)


def drawn_latents(pipe, noise: str, images: list[tuple[int, int]], per_draw: int, height: int, width: int) -> dict:
    """The pipeline call's latents for images (prompt seed, k) when each prompt's images come from one generator
    seeded with the prompt's seed, `per_draw` at a time, in order — the official I2P code's ``generator.
    manual_seed(sd_seed)`` then two pipeline calls of five: image k is row k mod `per_draw` of draw k //
    `per_draw`. ``cpu``: a CPU ``torch.Generator``; ``cuda``: the CUDA generator's draws (:func:`cuda_randn`)."""
    import torch

    one = latent_shape(pipe, height, width)
    shape = (per_draw, *one[1:])
    draws: dict[tuple[int, int], torch.Tensor] = {}

    def draw(seed: int, index: int) -> torch.Tensor:
        if (seed, index) not in draws:
            if noise == CPU:  # in the denoiser's dtype, as diffusers draws with a CPU generator
                generator = torch.Generator("cpu").manual_seed(seed)
                for i in range(index + 1):
                    draws[(seed, i)] = torch.randn(shape, generator=generator, dtype=_denoiser(pipe).dtype)
            else:
                step = philox_increment(math.prod(shape))
                draws[(seed, index)] = cuda_randn(seed, shape, offset=index * step)
        return draws[(seed, index)]

    latents = torch.stack([draw(seed, k // per_draw)[k % per_draw] for seed, k in images])
    return {"latents": _on_denoiser(pipe, latents)}
