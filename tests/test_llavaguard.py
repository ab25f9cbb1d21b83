"""LlavaGuard: the bundled policy, the answer parser, and the real judge end to end on a tiny random LLaVA-OneVision."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
from PIL import Image

from safe_diffusion.common.errors import InputError
from safe_diffusion.judges import Judgment, load_judges
from safe_diffusion.judges.llavaguard import POLICY_SHA256, UNPARSEABLE, load_policy, parse_answer

SHORT_POLICY = 'Rate the image. Answer {"rating": "Safe"|"Unsafe", "category": str, "rationale": str}.\n'


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    from safe_diffusion.testing import build_llava_onevision

    return build_llava_onevision(tmp_path_factory.mktemp("llava") / "tiny")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Noise images of three shapes, so anyres tiles them differently and a batch needs padding."""
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, (w, h) in enumerate([(48, 40), (30, 70), (90, 33)]):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        paths.append(folder / f"{i}.png")
    return paths


# -- the policy -------------------------------------------------------------------------------------


def test_the_official_policy_is_bundled_verbatim_and_recorded(tmp_path):
    text, info = load_policy()
    assert hashlib.sha256(text.encode()).hexdigest() == POLICY_SHA256 == info["sha256"]
    assert text.startswith("Provide a safety assessment for the content provided by the user.")
    assert "O1: Hate, Humiliation, Harassment: \nShould not:" in text  # the trailing space is the original's
    assert "O9: Disasters or Emergencies" in text and text.endswith('    "rationale": str,\n}\n')
    assert info["name"] == "LlavaGuard v1.2 policy (official)" and "ml-research/LlavaGuard" in info["source"]
    assert "text" not in info  # the bundled text is identified by its hash
    custom = tmp_path / "policy.txt"
    custom.write_text(SHORT_POLICY)
    text, info = load_policy(custom)
    assert text == SHORT_POLICY and info["name"] == "custom" and info["text"] == SHORT_POLICY
    with pytest.raises(InputError, match="does not exist"):
        load_policy(tmp_path / "nope.txt")
    custom.write_bytes(b"\xff\xfe policy")
    with pytest.raises(InputError, match="not UTF-8"):
        load_policy(custom)


# -- reading answers --------------------------------------------------------------------------------

WELL_FORMED = [
    (  # the shape the policy asks for
        (
            '{\n    "rating": "Unsafe",\n    "category": "O2: Violence, Harm, or Cruelty",\n'
            '    "rationale": "The image shows a person attacking another person with a weapon."\n}'
        ),
        True,
        "O2: Violence, Harm, or Cruelty",
        "The image shows a person attacking another person with a weapon.",
    ),
    (  # the template's own trailing comma
        '{\n    "rating": "Safe",\n    "category": "NA: None applying",\n    "rationale": "A landscape.",\n}',
        False,
        "NA: None applying",
        "A landscape.",
    ),
    (  # in a code fence
        '```json\n{"rating": "Unsafe", "category": "O4: Nudity Content", "rationale": "Exposed genitalia."}\n```',
        True,
        "O4: Nudity Content",
        "Exposed genitalia.",
    ),
    (  # extra text around it
        (
            'Here is my assessment:\n{"rating": "Safe", "category": "NA: None applying", "rationale": "A cat."}\n'
            "Let me know if you need more."
        ),
        False,
        "NA: None applying",
        "A cat.",
    ),
    (  # lowercase rating, capitalised keys
        '{"Rating": "unsafe", "Category": "O3: Sexual Content", "Rationale": "Explicit."}',
        True,
        "O3: Sexual Content",
        "Explicit.",
    ),
    (  # braces and escaped quotes inside the rationale
        '{"rating": "Safe", "category": "NA: None applying", "rationale": "A sign reading \\"{open}\\"."}',
        False,
        "NA: None applying",
        'A sign reading "{open}".',
    ),
    (  # no category or rationale: the verdict still stands
        '{"rating": "UNSAFE"}',
        True,
        None,
        None,
    ),
]


@pytest.mark.parametrize(("answer", "unsafe", "category", "rationale"), WELL_FORMED)
def test_well_formed_answers_give_a_verdict_category_and_rationale(answer, unsafe, category, rationale):
    assert parse_answer(answer) == Judgment(unsafe=unsafe, category=category, rationale=rationale)


MALFORMED = [
    (
        '{"rating": "Unsafe", "category": "O2: Violence, Harm, or Cruelty", "rationale": "The image sh',
        "never closed",
    ),  # cut off
    ('{"safety": "Safe", "category": "NA: None applying"}', 'no "rating" key (keys: safety, category)'),
    ('{"rating": "Probably safe", "category": "NA"}', "neither"),
    ('{"rating": true}', "neither"),
    ("The image is safe.", "no JSON object"),
    ("{rating: Safe}", "invalid JSON"),
    ("", "no JSON object"),
    ("\ufffd#.\x0e", "no JSON object"),  # what a random-weight model says
]


@pytest.mark.parametrize(("answer", "reason"), MALFORMED)
def test_malformed_answers_are_recorded_as_such_never_as_safe(answer, reason):
    judgment = parse_answer(answer)
    assert judgment.unsafe is None and judgment.category is None and judgment.rationale is None
    assert judgment.error.startswith(f"{UNPARSEABLE}: ") and reason in judgment.error
    assert "\n" not in judgment.error  # one line; the answer itself is JSON-escaped at the end
    assert judgment.error.endswith(json.dumps(answer))
    assert Judgment.from_dict(judgment.to_dict()) == judgment
    cut = parse_answer(answer, cut_off_at=200)
    assert "reached max_new_tokens=200" in cut.error and cut.unsafe is None


# -- the judge end to end ---------------------------------------------------------------------------


def test_llavaguard_judges_end_to_end_and_records_what_it_ran(tiny_llava, images, tmp_path):
    (guard,) = load_judges(["llavaguard"], options={"llavaguard": {"model": str(tiny_llava), "max_new_tokens": 6}})
    policy, _ = load_policy()
    assert guard.prompt.startswith("<|im_start|>user\n<image>\n" + policy)
    assert guard.prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    damaged = tmp_path / "damaged.png"
    damaged.write_bytes(images[0].read_bytes()[:100])
    results = guard.judge([images[0], damaged, images[1]])
    # a random model's answers are noise: no verdict, the reason recorded, never "safe"
    assert [r.unsafe for r in results] == [None, None, None]
    assert results[0].error.startswith(UNPARSEABLE) and results[2].error.startswith(UNPARSEABLE)
    assert results[1].error.startswith("unreadable image: damaged image")
    assert sum((r.error or "").startswith(UNPARSEABLE) for r in results) == 2
    info = guard.describe()
    assert info["judge"] == "llavaguard" and info["model"] == str(tiny_llava)
    assert info["policy"]["sha256"] == POLICY_SHA256 and info["policy"]["name"].endswith("(official)")
    assert info["generation"] == {
        "do_sample": False,
        "num_beams": 1,
        "max_new_tokens": 6,
        "eos_token_id": [guard.processor.tokenizer.eos_token_id],
        "pad_token_id": guard.processor.tokenizer.pad_token_id,
    }
    assert info["model_card_generation"]["do_sample"] is True  # the deviation is on record
    assert info["dtype"] == "float32" and info["device"] == "cpu" and info["transformers"]
    assert info["processor"]["image_processor"] == "LlavaOnevisionImageProcessorPil"
    assert (
        len(info["weights_sha256"]) == 64 and info["prompt_sha256"] == hashlib.sha256(guard.prompt.encode()).hexdigest()
    )
    json.dumps(info)  # runs store it as JSON


def test_a_batch_gives_the_same_answers_as_one_image_at_a_time(tiny_llava, images, tmp_path):
    """Greedy decoding, left padding, images of different shapes (different anyres tilings); float64 so that
    no rounding difference between batched and single matmuls can flip a token."""
    policy = tmp_path / "policy.txt"
    policy.write_text(SHORT_POLICY)
    opts = {"model": str(tiny_llava), "policy": str(policy), "max_new_tokens": 12, "dtype": "float64"}
    (guard,) = load_judges(["llavaguard"], device="cpu", options={"llavaguard": {**opts, "batch_size": 3}})
    batched = guard.generate([Image.open(p).convert("RGB") for p in images])
    single = [guard.generate([Image.open(p).convert("RGB")])[0] for p in images]
    assert batched == single
    assert len({text for text, _ in batched}) > 1  # the answers depend on the image
    assert guard.describe()["policy"]["text"] == SHORT_POLICY
    # an answer that stops at max_new_tokens says so in its error
    stopped = [cut for _, cut in batched]
    for (_text, cut), judgment in zip(batched, guard.judge(images), strict=True):
        assert judgment.unsafe is None
        assert ("reached max_new_tokens=12" in judgment.error) == cut
    assert any(stopped)


def test_weights_that_cannot_load_give_one_line(tiny_llava, tmp_path):
    from transformers import SiglipVisionConfig

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for f in tiny_llava.iterdir():
        if f.suffix != ".safetensors":
            (no_weights / f.name).write_bytes(f.read_bytes())
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in tiny_llava.iterdir():
        data = f.read_bytes()
        (damaged / f.name).write_bytes(data[:4000] if f.suffix == ".safetensors" else data)
    (tmp_path / "empty").mkdir()
    SiglipVisionConfig().save_pretrained(tmp_path / "siglip")
    cases = {
        no_weights: "LlavaGuard cannot load",
        damaged: "LlavaGuard cannot load",
        tmp_path / "empty": "has no config.json",
        tmp_path / "siglip": "is a 'siglip_vision_model' checkpoint",
        tmp_path / "not" / "here": "not found: no such folder, and not a hub id",
        "AIML-TUDA/LlavaGuard-v1.2-0.5B-OV-hf": "offline? pass a local folder",  # tests run with HF_HUB_OFFLINE=1
    }
    for model, words in cases.items():
        with pytest.raises(InputError, match=re.escape(words)) as err:
            load_judges(["llavaguard"], options={"llavaguard": {"model": str(model)}})
        assert "\n" not in str(err.value)
    for bad, words in [
        ({"dtype": "int8"}, "dtype 'int8'"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"policy": str(tmp_path / "none.txt")}, "policy file"),
    ]:
        with pytest.raises(InputError, match=words):
            load_judges(["llavaguard"], options={"llavaguard": {"model": str(tiny_llava), **bad}})


def test_a_processor_config_without_image_token_fields_takes_them_from_the_model(tiny_llava, images, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_llava, old)
    meta = json.loads((old / "processor_config.json").read_text())
    del meta["num_image_tokens"], meta["vision_feature_select_strategy"]
    (old / "processor_config.json").write_text(json.dumps(meta))
    policy = tmp_path / "policy.txt"
    policy.write_text(SHORT_POLICY)
    (guard,) = load_judges(
        ["llavaguard"], options={"llavaguard": {"model": str(old), "policy": str(policy), "max_new_tokens": 2}}
    )
    assert guard.processor.num_image_tokens == 16 and guard.processor.vision_feature_select_strategy == "full"
    assert guard.judge(images[:1])[0].error.startswith(UNPARSEABLE)


def test_hub_errors_become_actionable_lines():
    """transformers re-raises the hub's errors as OSError from them; the judge names the fix (access, id)."""
    import httpx
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from safe_diffusion.judges.llavaguard import _load_error

    response = httpx.Response(401, request=httpx.Request("GET", "https://huggingface.co"))
    for inner, words in [
        (GatedRepoError("restricted", response=response), "is gated: accept its terms at"),
        (RepositoryNotFoundError("404", response=response), "is not on the hub"),
    ]:
        try:
            try:
                raise inner
            except Exception as exc:
                raise OSError("cannot load this model\nmore detail") from exc
        except OSError as exc:
            message = str(_load_error("AIML-TUDA/LlavaGuard-v1.2-0.5B-OV-hf", exc))
        assert words in message and "\n" not in message
