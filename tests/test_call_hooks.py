"""Call hooks (engine/hooks.py), the engine's one mechanism for terms that act on the denoiser's call itself
(SAFREE is one): a user's own hook type registers without editing the package, sees every guided evaluation
with the other terms' concept rows, reaches the denoiser with what it changes, never the pipeline with
rows it appends, and is closed when the call ends, also on an error."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from helpers import PARITY_TOL

from safe_diffusion import SafetyGuidance, SafreeGuidance, guide
from safe_diffusion.common.errors import GuidanceError
from safe_diffusion.engine import Evaluation, GuidedDenoiser, register_call_hook
from safe_diffusion.engine.hooks import CALL_HOOKS

STEPS = 3
SLD = SafetyGuidance.from_preset("max")  # no warm-up: its concept rows are in every evaluation


@dataclass
class PromptAsNegative:
    """A test term: the prompt rows get the negative rows' conditioning; optionally one block of rows is
    appended (a copy of the prompt rows), or the hook fails at a given step."""

    append: bool = False
    fail_at: int | None = None
    seen: list = field(default_factory=list)
    closed: list = field(default_factory=list)
    outputs: list = field(default_factory=list)


class _Hook:
    def __init__(self, term: PromptAsNegative):
        self.term = term

    def before(self, kwargs: dict, evaluation: Evaluation) -> dict:
        rows = kwargs["sample"].shape[0]
        self.term.seen.append((evaluation, rows))
        if evaluation.step == self.term.fail_at:
            raise RuntimeError("hook failed")
        b = evaluation.batch
        embeds = kwargs["encoder_hidden_states"].clone()
        embeds[b : 2 * b] = embeds[:b]
        out = dict(kwargs, encoder_hidden_states=embeds)
        if self.term.append:
            out["sample"] = torch.cat([kwargs["sample"], kwargs["sample"][b : 2 * b]])
            out["encoder_hidden_states"] = torch.cat([embeds, embeds[b : 2 * b]])
            if torch.as_tensor(kwargs["timestep"]).ndim:
                out["timestep"] = torch.cat([kwargs["timestep"], kwargs["timestep"][b : 2 * b]])
        return out

    def after(self, output):
        self.term.outputs.append(None if output is None else output[0].shape[0])
        return None

    def close(self) -> None:
        self.term.closed.append(True)


def _check(term, pipe) -> None:
    if not hasattr(pipe, "unet"):
        raise GuidanceError(f"PromptAsNegative: {type(pipe).__name__} has no UNet")


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    import diffusers

    register_call_hook(PromptAsNegative, _check, lambda term, pipe, adapter, arguments: _Hook(term))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_checkpoint, torch_dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    CALL_HOOKS.pop(PromptAsNegative, None)


def _run(pipe, prompt="a cat", **kw):
    out = pipe(
        prompt,
        num_inference_steps=STEPS,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kw,
    )
    return out.images


@pytest.mark.parametrize("append", [False, True])
def test_a_registered_hook_changes_what_the_denoiser_sees_and_its_rows_never_reach_the_pipeline(pipe, append):
    term = PromptAsNegative(append=append)
    with guide(pipe, term):
        hooked = _run(pipe)
    # The prompt rows conditioned like the negative rows: the same image as an empty prompt, unguided.
    assert np.abs(hooked - _run(pipe, prompt="")).max() <= PARITY_TOL
    evaluations = len(term.seen)  # PNDM evaluates once more than its steps
    assert evaluations >= STEPS
    assert [e for e, _ in term.seen] == [Evaluation(step, 1, "batched") for step in range(evaluations)]
    assert {rows for _, rows in term.seen} == {2}  # [negative; prompt]: no concept rows without other terms
    assert term.outputs == [2] * evaluations  # appended rows are dropped before the pipeline (and the hook) sees them
    assert term.closed == [True]


def test_a_hook_sees_the_other_terms_concept_rows_and_they_keep_their_text(pipe):
    term = PromptAsNegative()
    with guide(pipe, term, SLD):
        both = _run(pipe)
    with guide(pipe, SLD):
        sld_on_empty = _run(pipe, prompt="")
    assert {rows for _, rows in term.seen} == {3}  # [negative; prompt; SLD's concept]
    assert np.abs(both - sld_on_empty).max() <= PARITY_TOL


def test_a_failing_hook_is_closed_and_the_pipeline_restored(pipe):
    term = PromptAsNegative(fail_at=1)
    plain = _run(pipe)
    with pytest.raises(RuntimeError, match="hook failed"), guide(pipe, term):
        _run(pipe)
    assert term.closed == [True]
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert not pipe.unet._forward_pre_hooks and not pipe.unet._forward_hooks
    assert np.array_equal(_run(pipe), plain)  # same execution repeated: bytes


def test_the_check_refuses_a_pipeline_on_entering_guide(pipe):
    class NoUNet:
        pass

    with pytest.raises(GuidanceError, match="has no UNet"), guide(NoUNet(), PromptAsNegative()):
        pass


@pytest.mark.parametrize("term", [SafreeGuidance(), PromptAsNegative()], ids=["safree", "own"])
def test_the_guided_denoiser_refuses_call_hook_terms_in_one_line(pipe, term):
    with pytest.raises(GuidanceError) as err:
        GuidedDenoiser(pipe, term, guidance_scale=7.5)
    message = str(err.value)
    assert "\n" not in message and type(term).__name__ in message and "guide(pipe" in message
