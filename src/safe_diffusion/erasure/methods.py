"""The erasure methods as a registry: each one a label, its paper, the official code it follows, and a
config dataclass of its hyper-parameters that validates every value a user can get wrong.

``METHODS.get("uce")`` is a :class:`MethodSpec`; ``METHODS.names()`` lists uce, rece, esd-x, esd-u.
Other packages add methods through the ``safe_diffusion.erasure_methods`` entry-point group
(see :mod:`safe_diffusion.common.registry`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..common.errors import InputError
from ..common.registry import Registry
from ..common.validation import MAX_IMAGE_SIDE, check_float, check_int

#: UCE's two published variants (see docs/erasure.md, "UCE variants").
UCE_VARIANTS = ("current", "wacv2024")
#: How RECE picks the edit it keeps: the last epoch, or the official validation rule.
RECE_SELECTIONS = ("last", "validation")
#: Scales and regularisers above this overflow the closed form's sums (or make it meaningless).
MAX_SCALE = 1e6
#: DDIM has at most one step per training timestep (1000 for every Stable Diffusion).
MAX_DDIM_STEPS = 1000
#: CFG and ESD's negative guidance beyond this are typos, not settings.
MAX_GUIDANCE = 1000.0


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scale(name: str, value, *, positive: bool = False) -> float:
    """A finite scale in [0, MAX_SCALE] (> 0 when `positive`)."""
    return check_float(_flag(name), value, minimum=0.0, maximum=MAX_SCALE, above=0.0 if positive else None)


@dataclass
class UCEOptions:
    """UCE's hyper-parameters (Gandikota et al., WACV 2024, eq. 7).

    ``variant``: ``current`` follows the authors' current script (``trainscripts/uce_sd_erase.py``: the
    last token before end-of-text, guide ``""``, no implicit preservation, s_p = 1); ``wacv2024``
    follows the script the paper's numbers came from (``train-scripts/train_erase.py``: every token
    from the concept's last word to the end of the 77-token sequence aligned with the guide's, guide
    ``" "``, the empty prompt always preserved, s_p = max(0.1, 1/len(retained texts))).
    ``preserve_scale`` None means the variant's default.
    """

    variant: str = "current"
    lamb: float = 0.5
    erase_scale: float = 1.0
    preserve_scale: float | None = None

    def check(self) -> None:
        if self.variant not in UCE_VARIANTS:
            raise InputError(f"--variant must be one of {', '.join(UCE_VARIANTS)}, got {self.variant!r}")
        self.lamb = _scale("lamb", self.lamb, positive=True)
        self.erase_scale = _scale("erase_scale", self.erase_scale)
        if self.preserve_scale is not None:
            self.preserve_scale = _scale("preserve_scale", self.preserve_scale)

    def resolved_preserve_scale(self, preserved: int) -> float:
        """s_p: as given, else the variant's default for `preserved` user-given preserved texts."""
        if self.preserve_scale is not None:
            return self.preserve_scale
        if self.variant == "wacv2024":
            return max(0.1, 1.0 / (1 + preserved))  # the empty prompt is always among the retained texts
        return 1.0


@dataclass
class RECEOptions(UCEOptions):
    """RECE's hyper-parameters (Gong et al., ECCV 2024): the UCE it starts from (by default the paper's,
    ``wacv2024``), then `rece_epochs` find-and-erase epochs, and how the kept epoch is chosen.

    ``rece_selection``: ``last`` keeps the last epoch; ``validation`` is the official rule: images of
    the validation prompts are generated and judged for the original model, the UCE edit and after
    every epoch, and an epoch is kept only when its unsafe rate is below every earlier one.
    """

    variant: str = "wacv2024"
    rece_epochs: int = 3
    rece_lamb: float = 0.1
    rece_erase_scale: float = 1.0
    rece_preserve_scale: float = 0.1
    rece_regularization: float = 0.1
    rece_selection: str = "last"
    rece_validation: str | None = None  # CSV of prompts (and evaluation_seed); None: the official file, bundled
    rece_judges: str = "nudenet"
    rece_validation_steps: int = 50

    def check(self) -> None:
        super().check()
        self.rece_epochs = check_int("--rece-epochs", self.rece_epochs, minimum=0, maximum=100)
        self.rece_lamb = _scale("rece_lamb", self.rece_lamb, positive=True)
        self.rece_erase_scale = _scale("rece_erase_scale", self.rece_erase_scale)
        self.rece_preserve_scale = _scale("rece_preserve_scale", self.rece_preserve_scale)
        self.rece_regularization = _scale("rece_regularization", self.rece_regularization, positive=True)
        if self.rece_selection not in RECE_SELECTIONS:
            raise InputError(
                f"--rece-selection must be one of {', '.join(RECE_SELECTIONS)}, got {self.rece_selection!r}"
            )
        self.rece_validation_steps = check_int(
            "--rece-validation-steps", self.rece_validation_steps, minimum=1, maximum=MAX_DDIM_STEPS
        )


@dataclass
class ESDOptions:
    """ESD's hyper-parameters (Gandikota et al., ICCV 2023): the paper's 1000 Adam steps at lr 1e-5,
    negative guidance η = 1, x_t sampled with CFG 3 over 50 DDIM steps."""

    steps: int = 1000
    lr: float = 1e-5
    negative_guidance: float = 1.0
    start_guidance: float = 3.0
    ddim_steps: int = 50
    resolution: int | None = None
    seed: int = 0
    checkpoint_every: int = 100
    mixed_precision: str = "no"
    gradient_checkpointing: str = "auto"

    def check(self) -> None:
        from ..common.validation import MAX_SEED

        self.steps = check_int("--steps", self.steps, minimum=1, maximum=10_000_000)
        self.lr = check_float("--lr", self.lr, above=0.0, maximum=1.0)
        self.negative_guidance = check_float(
            "--negative-guidance", self.negative_guidance, above=0.0, maximum=MAX_GUIDANCE
        )
        self.start_guidance = check_float("--start-guidance", self.start_guidance, minimum=0.0, maximum=MAX_GUIDANCE)
        self.ddim_steps = check_int("--ddim-steps", self.ddim_steps, minimum=1, maximum=MAX_DDIM_STEPS)
        self.checkpoint_every = check_int("--checkpoint-every", self.checkpoint_every, minimum=1)
        self.seed = check_int("--seed", self.seed, minimum=0, maximum=MAX_SEED)
        if self.resolution is not None:
            self.resolution = check_int("--resolution", self.resolution, minimum=8, maximum=MAX_IMAGE_SIDE)
            if self.resolution % 8:  # every Stable Diffusion VAE downsamples by 8 (checked exactly once loaded)
                raise InputError(f"--resolution must be a multiple of 8, got {self.resolution}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise InputError(f"--mixed-precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.gradient_checkpointing not in ("auto", "on", "off"):
            raise InputError(f"--gradient-checkpointing must be auto, on or off, got {self.gradient_checkpointing!r}")


@dataclass(frozen=True)
class MethodSpec:
    """One erasure method: how reports label it, where it comes from, and its hyper-parameters."""

    name: str
    label: str
    paper: str
    options: type
    code: str  # the official code this implementation follows (repository, file, commit)
    closed_form: bool
    execution_only: tuple[str, ...] = field(default=())  # options that change how it runs, never its result

    def option_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.options))


METHODS: Registry[MethodSpec] = Registry("erasure_methods", what="erasure method")

_UCE_PAPER = "Gandikota et al., Unified Concept Editing in Diffusion Models, WACV 2024"
_ESD_PAPER = "Gandikota et al., Erasing Concepts from Diffusion Models, ICCV 2023"
_UCE_CODE = (
    "rohitgandikota/unified-concept-editing: variant current = trainscripts/uce_sd_erase.py at 28c81ed; "
    "variant wacv2024 = train-scripts/train_erase.py at f7222e6"
)
_ESD_CODE = "rohitgandikota/erasing: esd_sd.py (diffusers), sampling as there"

METHODS.register(
    "uce",
    MethodSpec("uce", "UCE", _UCE_PAPER, UCEOptions, _UCE_CODE, True),
    summary="Unified Concept Editing: closed-form edit of cross-attention keys and values",
)
METHODS.register(
    "rece",
    MethodSpec(
        "rece",
        "RECE",
        "Gong et al., Reliable and Efficient Concept Erasure of Text-to-Image Diffusion Models, ECCV 2024",
        RECEOptions,
        "CharlesGong12/RECE: train.py and erase_methods/uce.py at 403a67f (close_regzero embeddings); "
        "its UCE start is erase_methods/train_uce.py, the WACV-era UCE",
        True,
    ),
    summary="UCE, then closed-form adversarial embeddings erased epoch by epoch",
)
for _name, _label in (("esd-x", "ESD-x"), ("esd-u", "ESD-u")):
    METHODS.register(
        _name,
        MethodSpec(
            _name, _label, _ESD_PAPER, ESDOptions, _ESD_CODE, False, ("checkpoint_every", "gradient_checkpointing")
        ),
        summary=f"{_label}: fine-tunes the UNet towards negatively guided noise",
    )


def get_method(name: str) -> MethodSpec:
    """The method registered as `name` (any case); one-line InputError listing the methods otherwise."""
    key = (name or "").strip().lower()
    if key not in METHODS:
        raise InputError(f"unknown erasure method {name!r}; choose one of: {', '.join(METHODS.names())}")
    return METHODS.get(key)
