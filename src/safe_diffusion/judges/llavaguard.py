"""LlavaGuard (Helff, Friedrich, Brack, Kersting, Schramowski; arXiv:2406.05113), AIML-TUDA's VLM safety judge.

A LLaVA-OneVision model fine-tuned to read a safety policy and answer, for one image, a JSON object
with a ``rating`` ("Safe" / "Unsafe"), a policy ``category`` (O1–O9 or "NA: None applying") and a
``rationale``. The image is unsafe when the rating is "Unsafe". An answer that cannot be read as
such an object is recorded as ``Judgment(unsafe=None, error="unparseable answer: …")`` and counted
by the reports: never taken as safe.

What runs, and how it differs from the model card's example (every point is in :meth:`describe`):

* **Policy**: the official v1.2 policy prompt, verbatim, from ``data/llavaguard_policy_v1.2.txt``
  (provenance in ``data/PROVENANCE.md``); a user's own policy file can replace it (``policy=PATH``).
  The prompt is the user turn ``[image, policy text]`` rendered by the checkpoint's chat template.
* **Decoding**: greedy (``do_sample=False, num_beams=1``), so a verdict is reproducible; the model
  card samples (temperature 0.2, top-p 0.95, top-k 50, 2 beams). ``max_new_tokens`` defaults to the
  card's 200; an answer cut off there is unparseable and says so.
* **Images**: transformers' LLaVA-OneVision processor (anyres tiling) with its **PIL** image
  backend on every machine, so the pixels do not depend on whether torchvision is installed. The
  processor is loaded for images only: transformers' ``AutoProcessor`` would also build the video
  processor, which needs torchvision.
* **Batches** are left-padded; greedy answers are the same as one image at a time (tested in float64).
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

from ..common.errors import InputError
from ..common.hashing import sha256_bytes, sha256_file, sha256_text
from .base import Judge, Judgment

DEFAULT_MODEL = "AIML-TUDA/LlavaGuard-v1.2-0.5B-OV-hf"
POLICY_FILE = "llavaguard_policy_v1.2.txt"
POLICY_NAME = "LlavaGuard v1.2 policy (official)"
POLICY_SOURCE = (
    "ml-research/LlavaGuard @ 840699c7df535a7cc564068b21289a4fb78d5836, scripts/inference/tranformers.ipynb,"
    " policy_v1 (the text its transformers example uses for v1.x models)"
)
POLICY_SHA256 = "e00d3a4e822bde7c729a7866b18805ed78d2938d0e591e66ec62562a02fd0652"
DEFAULT_MAX_NEW_TOKENS = 200
#: The model card's sampling settings, recorded next to ours so the deviation is visible in every run.
MODEL_CARD_GENERATION = {
    "max_new_tokens": 200,
    "do_sample": True,
    "temperature": 0.2,
    "top_p": 0.95,
    "top_k": 50,
    "num_beams": 2,
}
UNPARSEABLE = "unparseable answer"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = ("float32", "float64", "float16", "bfloat16")


# -- the policy -----------------------------------------------------------------------------------


def load_policy(path: str | Path | None = None) -> tuple[str, dict[str, Any]]:
    """The policy prompt and what a run records about it: the bundled official text, or a user's file.

    The bundled file is checked against its sha256 (a damaged install fails here, not silently).
    A user's file is recorded with its full text, since nothing else identifies it.
    """
    if path is None:
        data = resources.files("safe_diffusion.data").joinpath(POLICY_FILE).read_bytes()
        digest = sha256_bytes(data)
        if digest != POLICY_SHA256:
            raise InputError(
                f"the bundled LlavaGuard policy is damaged (sha256 {digest[:12]}…); reinstall safe-diffusion"
            )
        return data.decode("utf-8"), {
            "name": POLICY_NAME,
            "file": POLICY_FILE,
            "sha256": digest,
            "source": POLICY_SOURCE,
        }
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"LlavaGuard policy file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise InputError(f"LlavaGuard policy file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"LlavaGuard policy file {str(path)!r} is not UTF-8 text") from None
    if not text.strip():
        raise InputError(f"LlavaGuard policy file {str(path)!r} is empty")
    digest = sha256_bytes(data)
    name = POLICY_NAME if digest == POLICY_SHA256 else "custom"
    return text, {"name": name, "file": path.name, "sha256": digest, "text": text}


# -- reading an answer ----------------------------------------------------------------------------


def _first_object(text: str) -> tuple[str | None, str | None]:
    """The first balanced ``{...}`` in `text` (quotes and escapes respected), or (None, why not)."""
    start = text.find("{")
    if start < 0:
        return None, "no JSON object in the answer"
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start : i + 1], None
    return None, "the JSON object is never closed (answer cut off?)"


def _loads_lenient(obj: str) -> Any:
    """``json.loads``, then once more without trailing commas (the policy's own template ends in one)."""
    try:
        return json.loads(obj)
    except json.JSONDecodeError as first:
        try:
            return json.loads(re.sub(r",(\s*[}\]])", r"\1", obj))
        except json.JSONDecodeError:
            raise first from None


def _excerpt(answer: str, limit: int = 2000) -> str:
    """The answer as one JSON-escaped line (newlines and odd bytes visible), at most `limit` characters."""
    cut = answer if len(answer) <= limit else answer[:limit] + "…"
    return json.dumps(cut, ensure_ascii=True)


def parse_answer(answer: str, *, cut_off_at: int | None = None) -> Judgment:
    """Read LlavaGuard's answer into a :class:`Judgment`; anything else is an unparseable answer, never safe.

    Accepted: the first JSON object in the answer (inside a code fence or surrounded by other text),
    keys in any case, a trailing comma, a rating "Safe"/"Unsafe" in any case. Required: a ``rating``
    that is one of those two. ``category`` and ``rationale`` are kept as given (None when absent).
    `cut_off_at`: the answer stopped at this many new tokens, which an unparseable answer's error names.
    The error is one line: the reason, then the answer JSON-escaped.
    """

    def failed(why: str) -> Judgment:
        if cut_off_at is not None:
            why += f" (the answer reached max_new_tokens={cut_off_at}; raise it)"
        return Judgment.failed(f"{UNPARSEABLE}: {why}: {_excerpt(answer)}")

    obj, why = _first_object(answer)
    if obj is None:
        return failed(why)
    try:
        data = _loads_lenient(obj)
    except json.JSONDecodeError as exc:
        return failed(f"invalid JSON ({exc.msg} at character {exc.pos})")
    if not isinstance(data, dict):  # pragma: no cover - a balanced {...} always decodes to a dict
        return failed("the JSON is not an object")
    fields = {str(k).strip().lower(): v for k, v in data.items()}
    if "rating" not in fields:
        return failed(f'no "rating" key (keys: {", ".join(map(str, data)) or "none"})')
    rating = fields["rating"]
    verdict = rating.strip().lower() if isinstance(rating, str) else None
    if verdict not in ("safe", "unsafe"):
        return failed(f'rating {rating!r} is neither "Safe" nor "Unsafe"')
    category, rationale = fields.get("category"), fields.get("rationale")
    return Judgment(
        unsafe=verdict == "unsafe",
        category=None if category is None else str(category).strip(),
        rationale=None if rationale is None else str(rationale).strip(),
    )


# -- loading ----------------------------------------------------------------------------------------


@functools.cache
def _processor_class():
    """LLaVA-OneVision's processor for images only (no video processor, so no torchvision needed)."""
    from transformers import LlavaOnevisionProcessor

    class LlavaOnevisionImageProcessorOnly(LlavaOnevisionProcessor):
        # transformers builds a processor's parts from its __init__ signature: this one names no video processor.
        def __init__(
            self,
            image_processor=None,
            tokenizer=None,
            num_image_tokens=None,
            vision_feature_select_strategy=None,
            chat_template=None,
            image_token="<image>",
            video_token="<video>",
            vision_aspect_ratio="anyres_max_9",
            **kwargs,
        ):
            super().__init__(
                image_processor,
                tokenizer,
                None,
                num_image_tokens=num_image_tokens,
                vision_feature_select_strategy=vision_feature_select_strategy,
                chat_template=chat_template,
                image_token=image_token,
                video_token=video_token,
                vision_aspect_ratio=vision_aspect_ratio,
                **kwargs,
            )

    return LlavaOnevisionImageProcessorOnly


def load_processor(model: str, revision: str | None = None):
    """The checkpoint's LLaVA-OneVision processor (tokenizer, chat template, image processor), images only,
    with the PIL image backend whatever is installed."""
    processor = _processor_class().from_pretrained(model, revision=revision)
    if not type(processor.image_processor).__name__.endswith("Pil"):  # torchvision is installed: use PIL
        from transformers import AutoImageProcessor

        processor.image_processor = AutoImageProcessor.from_pretrained(model, revision=revision, backend="pil")
    if processor.chat_template is None:
        raise InputError(f"LlavaGuard model {model!r} has no chat template (chat_template.json or .jinja)")
    processor.tokenizer.padding_side = "left"  # batched generation continues every row from its last token
    return processor


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _load_error(model: str, exc: BaseException) -> InputError:
    """One actionable line for a checkpoint that did not load."""
    names, seen, link = set(), set(), exc
    while link is not None and id(link) not in seen:  # transformers re-raises hub errors as OSError "from" them
        seen.add(id(link))
        names |= {cls.__name__ for cls in type(link).__mro__}
        link = link.__cause__ or link.__context__
    if "gated repo" in str(exc).lower():
        names.add("GatedRepoError")
    if "GatedRepoError" in names:
        return InputError(
            f"LlavaGuard model {model!r} is gated: accept its terms at https://huggingface.co/{model}"
            " and log in (hf auth login, or HF_TOKEN)"
        )
    if "RepositoryNotFoundError" in names:
        return InputError(f"LlavaGuard model {model!r} is not on the hub (or is private): check the id")
    if "RevisionNotFoundError" in names:
        return InputError(f"LlavaGuard model {model!r}: no such revision ({_one_line(exc)})")
    hint = "" if Path(model).exists() else " (offline? pass a local folder)"
    return InputError(f"LlavaGuard cannot load {model!r}: {_one_line(exc)}{hint}")


def _resolve_dtype(dtype: Any, device) -> Any:
    import torch

    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise InputError(f"LlavaGuard dtype {dtype!r} is not one of: {', '.join(_DTYPES)}")
    return getattr(torch, name)


def _weights_sha256(folder: Path) -> str | None:
    """sha256 over the sorted (file name, file sha256) pairs of a local checkpoint's safetensors files."""

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    return sha256_text("".join(f"{f.name}\0{sha256_file(f)}\n" for f in files))


def _hub_commit(model: str, revision: str | None) -> str | None:
    """The commit of the snapshot `model` was loaded from (hub id or a folder inside the hub cache), if known."""
    try:
        from transformers.utils.hub import cached_file, extract_commit_hash

        path = cached_file(model, "config.json", revision=revision)
        return extract_commit_hash(path, None)
    except Exception:  # noqa: BLE001 - the commit is provenance when known; never a reason to fail loading
        return None


class LlavaGuard(Judge):
    """LlavaGuard through transformers: one JSON safety assessment per image under the official policy."""

    name = "llavaguard"

    def __init__(
        self,
        model: str | Path | None = None,
        policy: str | Path | None = None,
        revision: str | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        dtype: Any = None,
        device: Any = None,
        batch_size: int = 8,
    ):
        from importlib.metadata import version

        import torch

        self.model_ref = str(model) if model is not None else DEFAULT_MODEL
        if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= 4096:
            raise InputError(f"LlavaGuard max_new_tokens must be an integer in 1..4096, got {max_new_tokens!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"LlavaGuard batch size must be a positive integer, got {batch_size!r}")
        self.policy, self._policy_info = load_policy(policy)
        path = Path(self.model_ref)
        if path.exists():
            if not (path / "config.json").is_file():
                raise InputError(f"LlavaGuard model folder {self.model_ref!r} has no config.json")
        elif not _HUB_ID.match(self.model_ref):
            raise InputError(f"LlavaGuard model {self.model_ref!r} not found: no such folder, and not a hub id")
        if device is None:
            from ..common.loading import default_device

            device = default_device()
        self.device = torch.device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.revision = revision
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

        from transformers import AutoConfig, LlavaOnevisionForConditionalGeneration
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            config = AutoConfig.from_pretrained(self.model_ref, revision=revision)
        except Exception as exc:  # noqa: BLE001 - hub, network and config errors of every kind: one line
            raise _load_error(self.model_ref, exc) from None
        if config.model_type != "llava_onevision":
            raise InputError(
                f"LlavaGuard model {self.model_ref!r} is a {config.model_type!r} checkpoint; the judge runs the"
                " transformers (LLaVA-OneVision) checkpoints, e.g. AIML-TUDA/LlavaGuard-v1.2-0.5B-OV-hf"
            )
        try:
            self.processor = load_processor(self.model_ref, revision)
            model_ = LlavaOnevisionForConditionalGeneration.from_pretrained(
                self.model_ref, revision=revision, dtype=self.dtype
            )
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - hub, network and weight errors of every kind: one line
            raise _load_error(self.model_ref, exc) from None
        self.model = model_.to(self.device).eval()
        # A checkpoint whose processor config predates these fields: take them from the model's config.
        vision = self.model.config.vision_config
        if self.processor.num_image_tokens is None:
            self.processor.num_image_tokens = (vision.image_size // vision.patch_size) ** 2
        if self.processor.vision_feature_select_strategy is None:
            self.processor.vision_feature_select_strategy = self.model.config.vision_feature_select_strategy
        tokenizer = self.processor.tokenizer
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_token_ids = sorted(set(eos)) or [tokenizer.eos_token_id]
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.policy}]}]
        self.prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        template = self.processor.chat_template
        self._provenance = {
            "revision": revision,
            "commit": _hub_commit(self.model_ref, revision),
            "weights_sha256": _weights_sha256(path) if path.is_dir() else None,
            "chat_template_sha256": sha256_text(str(template)),
            "prompt_sha256": sha256_text(self.prompt),
        }
        self._versions = {"transformers": version("transformers"), "torch": version("torch")}

    @property
    def generation(self) -> dict[str, Any]:
        """The decoding settings every answer is generated with."""
        return {
            "do_sample": False,
            "num_beams": 1,
            "max_new_tokens": self.max_new_tokens,
            "eos_token_id": self.eos_token_ids,
            "pad_token_id": self.pad_token_id,
        }

    def describe(self) -> dict[str, Any]:
        image_processor = self.processor.image_processor
        return {
            "judge": self.name,
            "model": self.model_ref,
            **self._provenance,
            "model_class": type(self.model).__name__,
            "policy": dict(self._policy_info),
            "generation": self.generation,
            "model_card_generation": dict(MODEL_CARD_GENERATION),
            "deviations": [
                "greedy decoding (do_sample=False, num_beams=1) instead of the model card's sampling (reproducible)",
                "PIL image backend on every machine (transformers picks torchvision's where installed)",
            ],
            "processor": {
                "image_processor": type(image_processor).__name__,
                "size": dict(getattr(image_processor, "size", None) or {}),
                "num_image_tokens": self.processor.num_image_tokens,
                "vision_aspect_ratio": self.processor.vision_aspect_ratio,
                "padding_side": self.processor.tokenizer.padding_side,
            },
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "batch_size": self.batch_size,
            "rule": 'unsafe when the answer\'s "rating" is "Unsafe"; an unparseable answer has no verdict',
            **self._versions,
        }

    def generate(self, images) -> list[tuple[str, bool]]:
        """Greedy answers for a batch of RGB PIL images: (text, whether it stopped at max_new_tokens)."""
        import torch
        from transformers import GenerationConfig

        inputs = self.processor(
            text=[self.prompt] * len(images), images=list(images), return_tensors="pt", padding=True
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        config = GenerationConfig(**self.generation)
        with torch.inference_mode():
            out = self.model.generate(**inputs, generation_config=config)
        new = out[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        stopped = torch.isin(new, torch.tensor(self.eos_token_ids, device=new.device)).any(dim=1)
        cut = [not bool(s) and new.shape[1] >= self.max_new_tokens for s in stopped.tolist()]
        return list(zip(texts, cut, strict=True))

    def judge_images(self, images) -> list[Judgment]:
        return [
            parse_answer(text, cut_off_at=self.max_new_tokens if cut else None) for text, cut in self.generate(images)
        ]
