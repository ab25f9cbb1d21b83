"""``safe-diffusion erase``: a working run, and bad input as one line, exit status 2 and nothing written."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def no_cross_attention(tmp_path_factory, tiny_checkpoint):
    """A checkpoint whose UNet has no cross-attention (plain down/up blocks, no mid block)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(tiny_checkpoint, safety_checker=None, requires_safety_checker=False)
    pipe.unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None,
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    path = tmp_path_factory.mktemp("noxattn") / "model"
    pipe.save_pretrained(path)
    return path


def test_erase_command_writes_a_model(cli, tiny_checkpoint, tmp_path):
    out = tmp_path / "erased"
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("# artists\nnudity\n\nviolence\n")
    code, stdout, err = cli(
        "erase",
        "--method",
        "rece",
        "--erase-file",
        concepts,
        "--erase",
        "blood",
        "--guide-to",
        "a landscape",
        "--preserve",
        "a cat",
        "--rece-epochs",
        "1",
        "--model",
        tiny_checkpoint,
        "--out",
        out,
        "--device",
        "cpu",
    )
    assert code == 0, err
    assert "erased 3 concept(s) with RECE" in stdout
    from safe_diffusion.erasure import read_erasure_record

    record = read_erasure_record(out)
    assert record["concepts"] == {
        "erase": ["blood", "nudity", "violence"],
        "guide": ["a landscape"] * 3,
        "preserve": ["a cat"],
    }
    assert record["hyperparameters"]["rece_epochs"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "sld", "--erase", "nudity"], "unknown erasure method 'sld'"),
        (["--method", "uce"], "no concept to erase"),
        (["--method", "uce", "--erase", " "], "is empty"),
        (
            ["--method", "uce", "--erase", "a", "--erase", "b", "--erase", "c", "--guide-to", "x", "--guide-to", "y"],
            "2 --guide-to values for 3 concept(s)",
        ),
        (["--method", "uce", "--erase", "cat", "--preserve", "cat"], "both erased and preserved"),
        (["--method", "esd-x", "--erase", "cat", "--preserve", "dog"], "--preserve applies to uce and rece"),
        (["--method", "esd-u", "--erase", "cat", "--guide-to", "dog"], "--guide-to applies to uce and rece"),
        (["--method", "uce", "--erase", "cat", "--steps", "10"], "--steps applies to esd-x and esd-u, not uce"),
        (["--method", "esd-x", "--erase", "cat", "--lamb", "1"], "--lamb applies to uce and rece, not esd-x"),
        (["--method", "uce", "--erase", "cat", "--lamb", "0"], "--lamb must be above 0"),
        (["--method", "esd-x", "--erase", "cat", "--steps", "0"], "--steps must be at least 1"),
        (["--method", "esd-x", "--erase", "cat", "--mixed-precision", "fp8"], "--mixed-precision must be"),
        (["--method", "esd-x", "--erase", "cat", "--mixed-precision", "fp16", "--device", "cpu"], "needs a GPU"),
        (["--method", "uce", "--erase-file", "/no/such/file"], "not found"),
    ],
)
def test_bad_options_fail_in_one_line_and_write_nothing(cli, tiny_checkpoint, tmp_path, args, message):
    out = tmp_path / "new" / "erased"
    code, _, err = cli("erase", *args, "--model", tiny_checkpoint, "--out", out)
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []  # no output, no work folder, no parent folder


def test_bad_models_and_outputs_fail_in_one_line_and_write_nothing(cli, tiny_checkpoint, no_cross_attention, tmp_path):
    def run(model, out):
        return cli("erase", "--method", "uce", "--erase", "nudity", "--model", model, "--out", out, "--device", "cpu")

    before = set(tmp_path.iterdir())
    cases = [
        (no_cross_attention, tmp_path / "a", "has no text cross-attention"),
        (tmp_path / "missing", tmp_path / "b", "not found"),
        (tmp_path, tmp_path / "c", "no model_index.json"),
    ]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    afile = tmp_path / "afile"
    afile.write_text("")
    before |= {busy, afile}
    cases += [
        (tiny_checkpoint, busy, "is not empty"),
        (tiny_checkpoint, afile, "is not a folder"),
        (tiny_checkpoint, afile / "sub", "cannot be created"),
    ]
    for model, out, message in cases:
        code, _, err = run(model, out)
        assert code == 2, (out, err)
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert set(tmp_path.iterdir()) == before, err  # nothing written
    assert list(busy.iterdir()) == [busy / "x"]


def test_an_empty_output_folder_is_used(cli, tiny_checkpoint, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    code, _, err = cli("erase", "--method", "uce", "--erase", "nudity", "--model", tiny_checkpoint, "--out", out)
    assert code == 0, err
    assert (out / "erasure.json").is_file() and (out / "unet").is_dir()


def test_help_fits_80_columns(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, stdout, _ = cli("erase", "--help")
    assert code == 0
    assert max(len(line) for line in stdout.splitlines()) <= 80
    for flag in ("--method", "--erase", "--guide-to", "--preserve", "--rece-epochs", "--steps", "--copy"):
        assert flag in stdout
