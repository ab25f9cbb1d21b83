"""The demo's Sanitize tab: request validation, the handler on a real pipeline, and the tab served by gradio."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
from PIL import Image

from safe_diffusion.app.sanitize_tab import (
    SanitizeRequest,
    add_sanitize_tab,
    make_sanitize_handler,
    validate_sanitize_request,
)
from safe_diffusion.common.errors import InputError
from safe_diffusion.guidance.ledits import SAFETY_CONCEPTS

NO_PROGRESS = {"progress": lambda *a, **k: None}


def _image(size=(40, 32), seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_requests_are_normalised_and_bad_ones_named_in_one_line():
    r = validate_sanitize_request(["nudity", "blood"], " gore, blood \n", "fully clothed", "4", 6, 0.8, "3", False)
    assert r == SanitizeRequest(("nudity", "blood", "gore"), ("fully clothed",), 4, 6.0, 0.8, 3, False)
    for args, message in [
        (([], "", ""), "nothing to edit"),
        ((["blood"], "", "blood"), "'blood' is both removed and added"),
        ((["blood"], "", "", 1), "steps must be at least 2"),
        ((["blood"], "", "", 4, 5.0, 1.5), "mask threshold must be at most 0.99"),
        ((["blood"], "", "", 4, 5.0, 0.9, -1), "seed must be at least 0"),
        ((["blood"], "", "", 4, "x"), "edit scale must be a number"),
    ]:
        with pytest.raises(InputError, match=message):
            validate_sanitize_request(*args)


@pytest.fixture(scope="module")
def generator(tiny_checkpoint, tmp_path_factory):
    from safe_diffusion.app.core import DemoGenerator

    gen = DemoGenerator.load(str(tiny_checkpoint), device="cpu", output_root=tmp_path_factory.mktemp("demo"))
    yield gen
    gen.close()


def test_handler_edits_on_the_demo_pipeline_and_reports_problems_as_messages(generator):
    run = make_sanitize_handler(generator)
    image = _image()
    status, after, mask, settings = run(image, ["nudity"], "", "", 3, 5.0, 0.9, 0, True, **NO_PROGRESS)
    assert status.startswith("**Done.**") and "mask covers" in status
    assert after.size == mask.size == image.size
    doc = json.loads(settings)
    assert doc["remove"] == ["nudity"] and doc["steps"] == 3 and doc["work_size"] == [32, 24]
    inside = np.asarray(mask) > 0
    assert np.array_equal(np.asarray(after)[~inside], np.asarray(image)[~inside])  # kept outside the mask
    status, *_ = run(None, ["nudity"], "", "", 3, 5.0, 0.9, 0, True, **NO_PROGRESS)
    assert status == "**Cannot edit:** upload an image first"
    status, *_ = run(image, [], "", "", 3, 5.0, 0.9, 0, True, **NO_PROGRESS)
    assert status.startswith("**Cannot edit:** nothing to edit") and "Traceback" not in status


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_tab_is_served_and_its_button_runs_the_edit(generator, tmp_path):
    gr = pytest.importorskip("gradio")
    gradio_client = pytest.importorskip("gradio_client")

    with gr.Blocks(analytics_enabled=False) as demo:
        parts = add_sanitize_tab(generator)
    assert parts["remove"].value == list(SAFETY_CONCEPTS)
    demo.queue(default_concurrency_limit=1)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        path = tmp_path / "in.png"
        _image((32, 32), seed=1).save(path)
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        status, after, mask, settings = client.predict(
            gradio_client.handle_file(str(path)),
            ["blood", "weapons"],
            "",
            "",
            3,
            5.0,
            0.9,
            2,
            True,
            api_name="/sanitize",
        )
        assert status.startswith("**Done.**"), status
        assert Image.open(after).size == Image.open(mask).size == (32, 32)
        assert json.loads(settings)["seed"] == 2
    finally:
        demo.close()
