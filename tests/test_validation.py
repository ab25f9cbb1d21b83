"""Shared checks of user-given values: each failure is one line naming the option and what is allowed."""

import pytest

from safe_diffusion.common.errors import InputError
from safe_diffusion.common.validation import (
    MAX_SEED,
    check_device,
    check_float,
    check_image_side,
    check_int,
    check_seed,
    check_text,
)


@pytest.mark.parametrize(
    "value, words",
    [
        ("nan", "finite"),
        (float("inf"), "finite"),
        ("-inf", "finite"),
        ("x", "must be a number"),
        (-5, "above 1"),
        (1.0, "above 1"),
    ],
)
def test_check_float_refuses_non_finite_and_out_of_range(value, words):
    with pytest.raises(InputError, match=words):
        check_float("--guidance-scale", value, above=1.0)


def test_check_float_and_int_accept_good_values():
    assert check_float("--x", "7.5", above=1.0) == 7.5
    assert check_int("--steps", "12", minimum=1) == 12 and check_int("--steps", 3.0) == 3
    for bad in ("1.5", "nan", "ten", True):
        with pytest.raises(InputError, match="--steps must be a whole number"):
            check_int("--steps", bad)
    with pytest.raises(InputError, match="--steps must be at least 1, got 0"):
        check_int("--steps", 0, minimum=1)


def test_seeds_fit_the_generator_for_every_image():
    assert check_seed("--seed", MAX_SEED) == MAX_SEED
    with pytest.raises(InputError, match="at most"):
        check_seed("--seed", 18446744073709551617)
    with pytest.raises(InputError, match=f"at most {MAX_SEED - 3}"):
        check_seed("--seed", MAX_SEED, count=4)  # image 3 would overflow
    with pytest.raises(InputError, match="at least 0"):
        check_seed("--seed", -1)


def test_image_sides_and_text():
    assert check_image_side("--height", None) is None and check_image_side("--height", 512) == 512
    for bad, words in ((16384, "at most 4096"), (0, "at least 8"), (100, "multiple of 8")):
        with pytest.raises(InputError, match=words):
            check_image_side("--height", bad)
    assert check_text("the prompt", "a cat") == "a cat"
    with pytest.raises(InputError, match="not valid UTF-8"):
        check_text("the prompt", b"caf\xe9".decode("utf-8", "surrogateescape"))
    with pytest.raises(InputError, match="is empty"):
        check_text("the prompt", "  ")


def test_devices_that_do_not_exist_here_are_refused():
    import torch

    assert check_device("--device", "cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="'banana' is not a device"):
        check_device("--device", "banana")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available on this machine; use --device cpu"):
            check_device("--device", "cuda")


def test_the_warm_up_warning_reads_warm_ups_as_run_labels_do():
    """A warm-up given as a fraction of the run counts as the step it resolves to (the warning used to read
    only warmup_steps: SLD strong with warmup_fraction 0.5 was warned about at 4 steps, where it acts from 2)."""
    from safe_diffusion.guidance.activity import first_active_step, inactive_parts, warmup_problems
    from safe_diffusion.guidance.terms import SafetyGuidance

    by_fraction = SafetyGuidance.from_preset("strong", warmup_fraction=0.5)  # warm-up steps 7, fraction wins
    assert warmup_problems([by_fraction], 4) == []  # starts at step 2 of 4
    assert first_active_step([by_fraction], 4) == 2 and inactive_parts([by_fraction], 4) == []
    by_steps = SafetyGuidance.from_preset("strong")
    (problem,) = warmup_problems([by_steps], 4)
    assert problem.startswith("SafetyGuidance starts after a warm-up of 7 steps, but only 4 steps run")
