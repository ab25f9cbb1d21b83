"""The library's long jobs (generation, evaluation, attacks, erasure, sanitising, …): the CLI and the app only
parse their arguments and print what they return."""

from __future__ import annotations


def check_terms_act(pipe, terms, guidance_scale: float | None, negative_prompt: str | None, job: str) -> None:
    """Refuse in one line, before a job generates anything, guidance terms that the job's pipeline calls would
    run without classifier-free guidance to join (a FLUX or Qwen-Image pipeline, whose true CFG the jobs do not
    turn on): the engine would otherwise stop at the first image, with advice for Python callers."""
    from ..common.errors import GuidanceOffError
    from ..engine.support import cfg_off_reason
    from ..evals.config import DEFAULT_GUIDANCE_SCALE

    if not terms:
        return
    call = {"guidance_scale": DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale}
    if negative_prompt is not None:
        call["negative_prompt"] = negative_prompt
    reason = cfg_off_reason(pipe, call)
    # a scale of 1 or less is the jobs' own checks' business (they refuse or warn before loading); what they
    # cannot see is a pipeline whose CFG is a separate switch the jobs never turn on
    if reason is not None and "true_cfg_scale" in reason:
        name = type(pipe).__name__
        raise GuidanceOffError(
            f"safety and semantic guidance need classifier-free guidance, which {job}'s {name} calls run without"
            f" ({reason.split(';')[0]}); {job} does not turn on {name}'s true CFG; from Python: with guide(pipe,"
            " ...): pipe(prompt, true_cfg_scale=4.0, negative_prompt='')"
        )
