"""``python -m safe_diffusion.testing``: random-weight checkpoints and CLIPs for offline demos, built from the
command line (the CLI's deprecated ``demo-clip`` points here: production never imports testing/)."""

from __future__ import annotations

import pytest

from safe_diffusion.testing import FAMILIES
from safe_diffusion.testing.__main__ import main


def test_clip_and_checkpoint_folders_load_and_are_built_once(tmp_path, capsys):
    from transformers import CLIPModel

    from safe_diffusion.common.loading import load_pipeline

    main(["clip", str(tmp_path / "clip")])
    assert "wrote a random-weight CLIP" in capsys.readouterr().out
    assert CLIPModel.from_pretrained(tmp_path / "clip").config.projection_dim == 768
    main(["clip", str(tmp_path / "clip")])
    assert "CLIP already at" in capsys.readouterr().out
    main([str(tmp_path / "sd"), "--size", "tiny"])
    assert "built a random-weight 'tiny' checkpoint" in capsys.readouterr().out
    assert type(load_pipeline(str(tmp_path / "sd"), device="cpu")).__name__ == "StableDiffusionPipeline"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # built aside, renamed into place
    (tmp_path / "junk").mkdir()
    with pytest.raises(SystemExit):
        main(["clip", str(tmp_path / "junk")])
    assert "exists and is not a CLIP folder" in capsys.readouterr().err


def test_families_are_a_registry():
    assert {"sd", "sdxl", "flux", "wan"} <= set(FAMILIES.names())
    assert FAMILIES["SDXL"] is FAMILIES.get("sdxl") and FAMILIES.entry("wan").summary
