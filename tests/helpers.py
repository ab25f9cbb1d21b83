"""Helpers shared by test modules (fixtures live in conftest.py)."""


def run_cli(*args: str) -> int:
    """Run the console entry point in-process and return its exit status."""
    from safe_diffusion.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


#: Parity with a reference implementation is measured in float64. In float32, rounding differences of
#: ~1e-7 (which differ between CPUs: vector widths, FMA, BLAS kernels) flip single elements across
#: SEGA's percentile and SLD's threshold λ, and those discontinuities amplify them past 1e-4, so a
#: float32 parity test passes on one CPU and fails on another. In float64 the same computations agree
#: to 0.0; PARITY_TOL leaves room only for float64 rounding.
PARITY_TOL = 1e-6


#: The diffusers whose deprecated pipelines are the parity oracles (pyproject.toml's test extra pins it).
ORACLE_DIFFUSERS = "0.42.1"


def oracle(name: str):
    """diffusers' reference pipeline `name` (e.g. "StableDiffusionPipelineSafe"), a parity test's oracle.

    Its absence fails the test, with how to install it: a parity test that skipped silently would let a
    regression through exactly where CI lacks the reference.
    """
    import diffusers
    import pytest

    try:
        return getattr(diffusers, name)
    except (AttributeError, ImportError) as exc:
        pytest.fail(
            f"parity oracle diffusers.{name} is missing from diffusers {diffusers.__version__} ({exc}); install the"
            f" pinned one: pip install 'diffusers=={ORACLE_DIFFUSERS}' (or pip install -e '.[test]')",
            pytrace=False,
        )


def load_float64(cls, path, **kwargs):
    """``cls.from_pretrained(path)`` in float64, without a safety checker, progress bar off."""
    import torch

    pipe = cls.from_pretrained(
        path,
        torch_dtype=torch.float64,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_images_close(a, b, *, what: str = "image") -> None:
    """Two 8-bit images made by two *different* executions (processes, thread counts, batch shapes) agree.

    Float32 results round differently under other vector kernels, BLAS code paths (Intel/AMD) and thread
    counts; after quantisation to 8 bits that shows as a pixel one level off, and, where a threshold or a
    percentile flips, as a few pixels further off. The tolerance is derived from that: the mean difference
    stays below half a level and at most 0.5 % of the values differ by more than one level. A wrong seed,
    prompt or edit moves the mean by tens of levels, so the comparison still fails where it should.
    Bytes are compared only for one execution repeated (a resume, a rerun): see CONTRIBUTING.md.
    """
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(a) if not isinstance(a, np.ndarray) else a, dtype=np.int16)
    y = np.asarray(Image.open(b) if not isinstance(b, np.ndarray) else b, dtype=np.int16)
    assert x.shape == y.shape, f"{what}: shapes {x.shape} and {y.shape}"
    diff = np.abs(x - y)
    far = float((diff > 1).mean())
    assert diff.mean() < 0.5 and far <= 0.005, (
        f"{what}: mean difference {diff.mean():.3f} levels, {100 * far:.2f} % of values more than one level apart"
    )


#: Debian's chromium, driven headless by playwright (scripts/install-browser.sh installs both).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium():
    """A generator for a module fixture: yields a headless chromium (playwright), closes it after. Skips when
    chromium or playwright is missing, but fails under CI, which must run the browser tests."""
    import os
    import shutil
    from pathlib import Path

    import pytest

    path = os.environ.get("SAFE_DIFFUSION_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if not Path(path).is_file() or sync_playwright is None:
        reason = "chromium or playwright is not installed (run scripts/install-browser.sh)"
        pytest.fail(reason) if os.environ.get("CI") else pytest.skip(reason)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


#: Schedulers as a user builds them in code, with the library's defaults (``steps_offset=0``; DDIM clips x₀):
#: a pipeline constructed with one must keep or rewrite its config exactly as the reference pipeline does.
SCHEDULERS_BUILT_IN_CODE = {
    "DDIMScheduler()": ("DDIMScheduler", {}),
    "PNDMScheduler(skip_prk_steps=True)": ("PNDMScheduler", {"skip_prk_steps": True}),
    "LMSDiscreteScheduler()": ("LMSDiscreteScheduler", {}),
}


def scheduler_built_in_code(name: str):
    """A fresh scheduler of :data:`SCHEDULERS_BUILT_IN_CODE` (pipelines may rewrite the one they are given)."""
    import diffusers

    cls, kwargs = SCHEDULERS_BUILT_IN_CODE[name]
    return getattr(diffusers, cls)(**kwargs)


def official_clip_hidden(text_encoder, input_ids, inputs_embeds):
    """The attacks' official text encoders, ported (Diffusion-MU-Attack's ``CustomTextEncoder.forward``, P4D's
    ``_encode_embeddings``): embeddings from `inputs_embeds` (positions added), the encoder under the additive
    causal mask, the final layer norm."""
    import torch

    model = getattr(text_encoder, "text_model", text_encoder)  # transformers 5 folded text_model into the model
    hidden = model.embeddings(inputs_embeds=inputs_embeds)
    n = input_ids.shape[1]
    mask = torch.full((n, n), torch.finfo(hidden.dtype).min, dtype=hidden.dtype)
    cond = torch.arange(n)
    mask.masked_fill_(cond < (cond + 1).view(n, 1), 0)
    batch = inputs_embeds.shape[0]
    out = model.encoder(inputs_embeds=hidden, attention_mask=mask[None, None].expand(batch, 1, n, n))
    return model.final_layer_norm(out[0] if isinstance(out, tuple) else out.last_hidden_state)


def attack_args(checkpoint, out, suite, *extra) -> list[str]:
    """``attack run`` on the tiny checkpoint at 32 px, 2 steps, NudeNet judging; `suite` None: the protocol's."""
    where = ["-s", str(suite)] if suite is not None else []
    return ["attack", "run", "-m", str(checkpoint), "-o", str(out), *where, "--steps", "2", "--height", "32",
            "--width", "32", "--judges", "nudenet", *extra]  # fmt: skip
