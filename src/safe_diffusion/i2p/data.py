"""Moved to :mod:`safe_diffusion.evals.suites` (kept for imports of the I2P-only API)."""

from ..evals.suites import (  # noqa: F401
    BUNDLED_CSV,
    CATEGORIES,
    Q16_PROMPTS,
    Q16_PROMPTS_SHA256,
    Prompt,
    load_prompts,
    load_q16_prompts,
    parse_prompt_csv,
    select,
)
