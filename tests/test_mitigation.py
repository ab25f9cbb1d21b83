"""One serialisable mitigation: every guidance term round-trips through its config, a mitigation through its
record, and a frozen run's record rebuilds the guidance that made its images (issue 22)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from safe_diffusion.common.errors import InputError
from safe_diffusion.guidance import FairGuidance, SafetyGuidance, SemanticGuidance
from safe_diffusion.guidance.mitigation import (
    MITIGATIONS,
    Mitigation,
    register_mitigation,
    term_config,
    term_from_config,
)


@dataclass(frozen=True)
class SteerAway(SafetyGuidance):
    """A method registered by name, as SAFREE registers itself: SLD's math under another name and defaults."""

    concept: str = "rain, clouds"
    warmup_steps: int = 0


@pytest.fixture
def steer_away():
    register_mitigation("steer-away", SteerAway, label="Steer-away", summary="a test method")
    yield "steer-away"
    MITIGATIONS.unregister("steer-away")


def _json(value):
    return json.loads(json.dumps(value))


TERMS = [
    SafetyGuidance(),
    SafetyGuidance.from_preset("max", concept="rain", space="epsilon"),
    SafetyGuidance(warmup_fraction=0.25, threshold=0.02),
    SemanticGuidance(["hat", "beard"], reverse=[False, True], scale=[3, 4.5], warmup_steps=[0, 2]),
    SemanticGuidance("glasses", warmup_fraction=0.1, cooldown_fraction=[0.9], weights=[2.0]),
    FairGuidance(["male person", "female person"], [0.3, 0.7]),
    FairGuidance(["a", "b", "c"], run_length=6).for_seeds([4, 5, 6]),
]


@pytest.mark.parametrize("term", TERMS, ids=lambda t: type(t).__name__)
def test_every_term_round_trips_through_its_config(term):
    config = _json(term.to_config())
    assert config["type"] == type(term).__name__
    rebuilt = term_from_config(config)
    assert type(rebuilt) is type(term) and rebuilt == term
    assert type(term).from_config(config) == term
    # describe() is the config plus read-only facts about one use: it rebuilds the same term
    assert term_from_config(_json(term.describe("flow"))) == term
    assert {k: v for k, v in term.describe().items() if k != "assigned_directions"} == config


def test_embeddings_have_no_config_and_bad_configs_are_one_line():
    term = SafetyGuidance(concept=torch.zeros(4, 8))
    assert term.describe()["concept"] == "<embeddings>"
    with pytest.raises(ValueError, match="precomputed embeddings"):
        term.to_config()
    with pytest.raises(InputError, match="precomputed embeddings"):
        term_from_config(term.describe())
    with pytest.raises(InputError, match=r"unknown guidance term type 'NoSuchGuidance'"):
        term_from_config({"type": "NoSuchGuidance"})
    with pytest.raises(InputError, match=r"cannot rebuild SafetyGuidance from its record: .*'bogus'"):
        term_from_config({"type": "SafetyGuidance", "bogus": 1})
    with pytest.raises(InputError, match="cannot rebuild SemanticGuidance"):
        term_from_config({"type": "SemanticGuidance", "concepts": ["a"], "threshold": 2.0})


def test_labels_kinds_and_presets():
    assert (Mitigation().label, Mitigation().kind, Mitigation().sld_preset) == ("SD", "none", None)
    strong = Mitigation.build(safety="strong", safety_concept="rain")
    assert (strong.label, strong.kind, strong.sld_preset) == ("SLD strong", "sld", "strong")
    assert strong.safety == SafetyGuidance.from_preset("strong", concept="rain")
    custom = Mitigation(guidance=(SafetyGuidance(scale=123.0),))
    assert custom.label == "SLD custom"
    erased = Mitigation.build(safety="max", edits=["+hat"], negative_prompt="blur").with_erasure({"method": "uce"})
    assert erased.label == "UCE + SLD max + SEGA + negative prompt"
    assert erased.kind == "erased+sld+sega+negative_prompt"
    fair = Mitigation.build(safety="off", fair=["a", "b"], fair_seeds=[0, 1])
    assert fair.label == "Fair Diffusion" and fair.fair.seeds == [0, 1] and fair.fair.run_length == 2
    with pytest.raises(InputError, match="unknown safety preset 'extreme'"):
        Mitigation.build(safety="extreme")
    with pytest.raises(InputError, match="--fair-proportions given without --fair"):
        Mitigation.build(fair_proportions=[0.5, 0.5])


def test_methods_join_by_name(steer_away):
    built = Mitigation.build(safety="weak", methods=["Steer-Away"])
    assert built.terms() == [SafetyGuidance.from_preset("weak"), SteerAway()]
    assert built.label == "SLD weak + Steer-away" and built.kind == "sld+steer-away"
    assert Mitigation.from_dict(_json(built.to_dict())) == built  # a registered type rebuilds from its record
    with pytest.raises(InputError, match=r"unknown mitigation 'nope'; choose from: safree, steer-away"):
        Mitigation.build(methods=["nope"])


def test_no_method_registered_says_so():
    assert "steer-away" not in MITIGATIONS
    registered = MITIGATIONS.entries()  # SAFREE registers itself; take every entry out for this test
    for entry in registered:
        MITIGATIONS.unregister(entry.name)
    try:
        with pytest.raises(InputError, match="none is registered"):
            Mitigation.build(methods=["safree"])
    finally:
        for entry in registered:
            MITIGATIONS.register(entry.name, entry.target, summary=entry.summary, **entry.metadata)


def test_a_mitigation_round_trips_through_its_record():
    m = Mitigation.build(
        safety="strong",
        safety_concept="rain",
        edits=["+hat", "-beard"],
        edit_scale=[3, 4],
        edit_warmup=[0],
        fair=["x", "y"],
        fair_proportions=[0.25, 0.75],
        fair_seeds=[7, 8, 9, 10],
        negative_prompt="blurry",
    ).with_erasure({"method": "rece", "label": "RECE", "concepts": {"erase": ["nudity"]}})
    record = _json(m.to_dict())
    assert list(record) == ["kind", "label", "sld_preset", "guidance", "negative_prompt", "erasure"]
    rebuilt = Mitigation.from_dict(record)
    assert rebuilt == m and rebuilt.terms() == m.terms() and rebuilt.to_dict() == record
    assert [t.for_seeds([1]).seeds for t in rebuilt.terms() if hasattr(t, "for_seeds")] == [[1]]


def test_records_written_before_configs_existed_rebuild():
    """Runs made before terms had to_config recorded describe(): those records rebuild too."""
    old = {
        "kind": "sld",
        "label": "SLD max",
        "sld_preset": "max",
        "negative_prompt": None,
        "erasure": None,
        "guidance": [
            {
                "type": "SafetyGuidance",
                "concept": "hate",
                "scale": 5000,
                "warmup_steps": 0,
                "threshold": 1.0,
                "momentum_scale": 0.5,
                "mom_beta": 0.7,
                "warmup_fraction": None,
                "space": "auto",
            }
        ],
    }
    m = Mitigation.from_dict(old)
    assert m.terms() == [SafetyGuidance.from_preset("max", concept="hate")] and m.label == "SLD max"


# -- a frozen run rebuilds its own images --------------------------------------------------------------

RUN = [
    "--suite",
    "i2p",
    "--limit",
    "2",
    "--images-per-prompt",
    "1",
    "--steps",
    "2",
    "--height",
    "32",
    "--width",
    "32",
    "--batch-size",
    "1",
    "--judges",
    "none",
]


def test_a_frozen_runs_record_rebuilds_its_mitigation_and_images(cli, tiny_checkpoint, tmp_path, steer_away):
    from safe_diffusion.common.loading import load_pipeline
    from safe_diffusion.evals import runner
    from safe_diffusion.evals.store import RunStore

    run = tmp_path / "run"
    asked = ["--safety", "max", "--mitigation", steer_away, "--negative-prompt", "blurry"]
    code, _, err = cli("eval", "run", "--model", tiny_checkpoint, "--out", run, *RUN, *asked)
    assert code == 0, err
    original = RunStore.open(run)
    frozen = original.config
    rebuilt = Mitigation.from_dict(frozen["mitigation"])
    expected = Mitigation.build(safety="max", methods=[steer_away], negative_prompt="blurry")
    assert rebuilt.terms() == expected.terms() and rebuilt.negative_prompt == "blurry"
    assert frozen["mitigation"]["label"] == "SLD max + Steer-away + negative prompt"

    pipe = load_pipeline(str(tiny_checkpoint), device="cpu")

    def regenerate(folder, mitigation):
        store = RunStore.create_or_resume(folder, frozen, original.prompts(), {}, limit=2)
        runner.generate(pipe, store, terms=mitigation.terms(), show_progress=False)
        return {k: (folder / r["image"]).read_bytes() for k, r in store.images().items()}

    first = {k: (run / r["image"]).read_bytes() for k, r in original.images().items()}
    # Same process, same batches (batch size 1): the same execution repeated, so the bytes are compared.
    assert regenerate(tmp_path / "again", rebuilt) == first
    # ... and the comparison would see a lost term: without the registered method the images differ.
    without = Mitigation(guidance=rebuilt.guidance[:1], negative_prompt="blurry")
    assert regenerate(tmp_path / "without", without) != first


def test_generate_sidecar_rebuilds_the_guided_image(cli, tiny_checkpoint, tmp_path):
    from PIL import Image

    from safe_diffusion.common.loading import load_pipeline
    from safe_diffusion.jobs.compare import generate_guided_images

    out = tmp_path / "gen"
    code, _, err = cli(
        "generate",
        "a cat",
        "--model",
        tiny_checkpoint,
        "--out",
        out,
        "--safety",
        "max",
        "--edit",
        "+hat",
        "--edit-warmup",
        "0",
        "--negative-prompt",
        "blurry",
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "32",
        "--seed",
        "5",
    )
    assert code == 0, err
    sidecar = json.loads((out / "0000-seed5.json").read_text())
    mitigation = Mitigation.from_dict(sidecar["mitigation"])
    assert sidecar["mitigation"]["label"] == "SLD max + SEGA + negative prompt"
    pipe = load_pipeline(str(tiny_checkpoint), device="cpu")
    made = generate_guided_images(
        pipe,
        "a cat",
        [5],
        mitigation.terms(),
        negative_prompt=mitigation.negative_prompt,
        num_inference_steps=2,
        guidance_scale=7.5,
        height=32,
        width=32,
    )
    # In-process CLI and this call: one process, one batch of one image, so the pixels are compared exactly.
    assert list(made.guided[0].getdata()) == list(Image.open(out / "0000-seed5.png").getdata())


def test_term_config_needs_a_config_or_dataclass():
    class Opaque:
        pass

    with pytest.raises(ValueError, match="Opaque cannot be recorded"):
        term_config(Opaque())
