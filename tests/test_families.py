"""guide() on every family it serves, each a tiny random-weight checkpoint built offline and loaded with from_pretrained.

Per family: no terms → the plain output bit for bit; SLD and SEGA change the output and stay finite;
SLD whose safety concept is the prompt itself changes nothing; the denoiser's calls and rows per
step (one batched call, or the pipeline's two calls with the concept rows riding on the prompt's);
the pipeline exactly restored afterwards. Everything runs in float64 (see helpers.PARITY_TOL).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from helpers import PARITY_TOL

from safe_diffusion import SafetyGuidance, SemanticGuidance, guide
from safe_diffusion.common.errors import GuidanceError

STEPS = 2
SLD = SafetyGuidance.from_preset("max")  # no warm-up: acts from the first step
SEGA = SemanticGuidance(["sunglasses", "a red hat"], reverse=[False, True], warmup_steps=0)


def _control_image():
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _mask():
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1.0
    return mask


@dataclass
class Family:
    builder: str
    call: dict
    pipeline: str | None = None  # load with this class instead of the folder's own
    separate_calls: bool = False
    load: dict = field(default_factory=dict)
    output: str = "images"


FAMILIES = {
    "sd": Family("sd", dict(height=32, width=32)),
    "sdxl": Family("sdxl", dict(height=32, width=32)),
    "sd3": Family(
        "sd3",
        dict(height=32, width=32, max_sequence_length=8, guidance_scale=5.0),
        load=dict(text_encoder_3=None, tokenizer_3=None),
    ),
    "flux": Family(
        "flux",
        dict(height=32, width=32, max_sequence_length=16, true_cfg_scale=4.0, negative_prompt=""),
        separate_calls=True,
    ),
    "pixart-sigma": Family(
        "pixart-sigma",
        dict(
            height=32,
            width=32,
            max_sequence_length=16,
            guidance_scale=4.5,
            use_resolution_binning=False,
            clean_caption=False,
        ),
    ),
    "qwen-image": Family(
        "qwen-image", dict(height=32, width=32, true_cfg_scale=4.0, negative_prompt=" "), separate_calls=True
    ),
    "wan": Family(
        "wan",
        dict(height=16, width=16, num_frames=5, max_sequence_length=16, guidance_scale=5.0),
        separate_calls=True,
        output="frames",
    ),
    "sd-controlnet": Family("sd-controlnet", dict(height=32, width=32, image=_control_image())),
    "sdxl-controlnet": Family("sdxl-controlnet", dict(height=32, width=32, image=_control_image())),
    "sd-inpaint": Family("sd-inpaint", dict(height=32, width=32, image=_control_image(), mask_image=_mask())),
    "sdxl-inpaint": Family(
        "sdxl",
        dict(height=32, width=32, image=_control_image(), mask_image=_mask(), strength=1.0),
        pipeline="StableDiffusionXLInpaintPipeline",
    ),
}


@pytest.fixture(scope="module")
def pipes(family_checkpoints):
    import diffusers

    loaded = {}

    def get(name):
        if name not in loaded:
            fam = FAMILIES[name]
            cls = getattr(diffusers, fam.pipeline) if fam.pipeline else diffusers.DiffusionPipeline
            pipe = cls.from_pretrained(family_checkpoints(fam.builder), torch_dtype=torch.float64, **fam.load)
            pipe.set_progress_bar_config(disable=True)
            loaded[name] = pipe
        return loaded[name]

    return get


def _denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _run(name, pipe, prompt="a cat", **extra):
    fam = FAMILIES[name]
    out = pipe(
        prompt,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **{**fam.call, **extra},
    )
    return np.asarray(getattr(out, fam.output))


def _rows(pipe, fn):
    """Run `fn`, recording the number of rows of every denoiser evaluation (hook registered last: it sees the
    batch the denoiser really evaluates)."""
    den = _denoiser(pipe)
    rows = []

    def record(module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        rows.append(sample.shape[0])

    handle = den.register_forward_pre_hook(record, with_kwargs=True)
    try:
        return fn(), rows
    finally:
        handle.remove()


def _state(pipe):
    den = _denoiser(pipe)
    return type(pipe), set(vars(pipe)), dict(den._forward_pre_hooks), dict(den._forward_hooks)


NAMES = list(FAMILIES)


@pytest.mark.parametrize("name", NAMES)
def test_family(pipes, name):
    pipe = pipes(name)
    fam = FAMILIES[name]
    plain, plain_rows = _rows(pipe, lambda: _run(name, pipe))
    before = _state(pipe)

    with guide(pipe):
        assert np.array_equal(_run(name, pipe), plain)  # no terms: the plain output, bit for bit

    outputs, rows = {}, {}
    for label, term in (("sld", SLD), ("sega", SEGA)):
        with guide(pipe, term):
            outputs[label], rows[label] = _rows(pipe, lambda: _run(name, pipe))
        assert outputs[label].shape == plain.shape
        assert np.isfinite(outputs[label]).all(), label
        assert np.abs(outputs[label] - plain).max() > 1e-3, f"{label} changed nothing on {name}"

    # denoiser evaluations: as many as without guidance (PNDM takes steps + 1), the concept rows riding along
    if fam.separate_calls:
        n = len(plain_rows) // 2
        assert n >= STEPS and plain_rows == [1, 1] * n
        assert rows["sld"] == [2, 1] * n and rows["sega"] == [3, 1] * n
    else:
        n = len(plain_rows)
        assert n >= STEPS and plain_rows == [2] * n
        assert rows["sld"] == [3] * n and rows["sega"] == [4] * n

    with guide(pipe, SafetyGuidance.from_preset("max", concept="a cat")):
        itself = _run(name, pipe)
    assert np.abs(itself - plain).max() <= PARITY_TOL, "a safety concept equal to the prompt must change nothing"

    with pytest.raises(RuntimeError), guide(pipe, SLD, SEGA):
        raise RuntimeError("user code failed inside the block")
    after = _state(pipe)
    assert after[0] is before[0] and after[1] == before[1] and after[2] == before[2] and after[3] == before[3]
    assert np.array_equal(_run(name, pipe), plain)


@pytest.mark.parametrize("name", ["sdxl", "sd3"])
def test_concepts_are_encoded_with_the_calls_clip_skip(pipes, name):
    pipe = pipes(name)
    plain = _run(name, pipe, clip_skip=1)
    with guide(pipe, SafetyGuidance.from_preset("max", concept="a cat")):
        itself = _run(name, pipe, clip_skip=1)
    assert np.abs(itself - plain).max() <= PARITY_TOL


@pytest.mark.parametrize("name", ["flux", "qwen-image"])
def test_true_cfg_pipelines_without_cfg_are_a_one_line_error(pipes, name):
    pipe = pipes(name)
    call = {k: v for k, v in FAMILIES[name].call.items() if k not in ("true_cfg_scale", "negative_prompt")}
    with pytest.raises(GuidanceError) as err, guide(pipe, SLD):
        pipe("a cat", num_inference_steps=1, output_type="np", **call)
    message = str(err.value)
    assert "\n" not in message and type(pipe).__name__ in message
    assert "need classifier-free guidance" in message and "true_cfg_scale > 1 and a negative_prompt" in message
    assert type(pipe).__name__ == type(pipe).__mro__[0].__name__ and not _denoiser(pipe)._forward_hooks


@pytest.mark.parametrize("job", ["generate", "eval"])
def test_the_jobs_refuse_guidance_on_true_cfg_pipelines_before_writing(family_checkpoints, tmp_path, cli, capsys, job):
    """The jobs never turn on FLUX's true CFG, so SLD there could not act: one line naming the way out (the
    Python API), before the output folder exists, instead of a stop at the first image."""
    folder = family_checkpoints("flux")
    capsys.readouterr()
    out = tmp_path / "out"
    common = [
        "-m",
        str(folder),
        "-o",
        str(out),
        "--steps",
        "9",
        "--height",
        "32",
        "--width",
        "32",
        "--safety",
        "strong",
    ]
    if job == "generate":
        args = ["generate", *common, "a cat"]
    else:
        suite = tmp_path / "s.csv"
        suite.write_text("prompt\na cat\n")
        args = ["eval", "run", *common, "-s", str(suite), "--judges", "none"]
    code, _, err = cli(*args)
    assert code == 2 and err.count("\n") == 1, err
    assert "need classifier-free guidance" in err and f"{job.replace('eval', 'eval run')} does not turn on" in err
    assert "true_cfg_scale=4.0" in err and not out.exists()


def test_qwen_concepts_of_other_lengths_than_the_prompt_are_padded_and_masked(pipes):
    pipe = pipes("qwen-image")
    # prompts shorter and longer than the concepts: rows of different lengths share one masked batch
    for prompt in ("a", "a very long description of a cat sitting on a sofa in the afternoon sun"):
        plain = _run("qwen-image", pipe, prompt=prompt)
        with guide(pipe, SEGA):
            edited = _run("qwen-image", pipe, prompt=prompt)
        assert np.isfinite(edited).all() and np.abs(edited - plain).max() > 1e-4


def test_sd3_skip_layer_guidance_leaves_the_correction_at_the_cfg_scale(pipes):
    """SD 3.5's skip-layer guidance adds s·(ε_p − ε_skip) after CFG. The engine's Δ enters ε_p; its skip-layer
    call gets the same Δ, so the pipeline's term stays s·(ε_p − ε_skip) of the raw estimates and Δ is weighted
    g, not g + s (1.56× at g = 5, s = 2.8)."""
    pipe = pipes("sd3")
    den = _denoiser(pipe)
    raw, seen = [], []  # what the transformer returned, and what the pipeline received
    before = den.register_forward_hook(lambda m, a, k, out: raw.append(out[0].clone()), with_kwargs=True)
    try:
        with guide(pipe, SLD):
            after = den.register_forward_hook(lambda m, a, k, out: seen.append(out[0].clone()), with_kwargs=True)
            try:
                _run("sd3", pipe, skip_guidance_layers=[0], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
            finally:
                after.remove()
    finally:
        before.remove()
    pairs = list(zip(raw, seen))
    main = [(r, s) for r, s in pairs if r.shape[0] > 1]  # [negative; prompt; concept] → [negative; prompt]
    skip = [(r, s) for r, s in pairs if r.shape[0] == 1]  # the skip-layer call: prompt rows only
    assert len(skip) >= 1 and len(main) == STEPS
    for (m_raw, m_seen), (k_raw, k_seen) in zip(main[1:], skip):  # SLG acts on steps with i > 0
        text_raw, text_seen = m_raw[1:2], m_seen[1:2]
        assert (text_seen - text_raw).abs().max() > 1e-6  # SLD corrects the prompt's estimate …
        torch.testing.assert_close(text_seen - k_seen, text_raw - k_raw, rtol=0, atol=1e-12)  # … not the SLG term


def _embeds(name, pipe, length):
    """The prompt "a cat" and the pipeline's default negative prompt, encoded by the pipeline to `length` tokens."""
    if name == "sd3":
        pe, ne, pooled, npooled = pipe.encode_prompt(
            "a cat", None, None, max_sequence_length=length, negative_prompt=""
        )
        return dict(prompt_embeds=pe, negative_prompt_embeds=ne, pooled_prompt_embeds=pooled,
                    negative_pooled_prompt_embeds=npooled)  # fmt: skip
    if name == "flux":
        pe, pooled, _ = pipe.encode_prompt("a cat", None, max_sequence_length=length)
        ne, npooled, _ = pipe.encode_prompt("", None, max_sequence_length=length)
        return dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, negative_prompt_embeds=ne,
                    negative_pooled_prompt_embeds=npooled, negative_prompt=None)  # fmt: skip
    if name == "pixart-sigma":
        pe, pm, ne, nm = pipe.encode_prompt(
            "a cat", negative_prompt="", max_sequence_length=length, clean_caption=False
        )
        return dict(prompt_embeds=pe, prompt_attention_mask=pm, negative_prompt_embeds=ne,
                    negative_prompt_attention_mask=nm, negative_prompt=None)  # fmt: skip
    pe, ne = pipe.encode_prompt("a cat", "", max_sequence_length=length)
    return dict(prompt_embeds=pe, negative_prompt_embeds=ne)


@pytest.mark.parametrize("name", ["sd3", "flux", "pixart-sigma", "wan"])
def test_prompt_embeds_shorter_than_the_default_length_are_guided(pipes, name):
    """A caller's prompt_embeds of L tokens (the plain pipeline takes them): the concepts are encoded to L tokens
    too, so the guided call equals the same call with the prompt as text and max_sequence_length=L. Before, the
    concepts were encoded to the default length (256/512/300) and the call was refused."""
    pipe = pipes(name)
    length = FAMILIES[name].call["max_sequence_length"]
    with guide(pipe, SLD):
        expected = _run(name, pipe)
    call = {k: v for k, v in FAMILIES[name].call.items() if k != "max_sequence_length"}
    with torch.no_grad():
        embeds = _embeds(name, pipe, length)
    with guide(pipe, SLD):
        out = pipe(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np",
                   **{**call, **embeds})  # fmt: skip
    got = np.asarray(getattr(out, FAMILIES[name].output))
    assert np.abs(got - expected).max() <= PARITY_TOL
