"""The web demo: validation and generation without a UI, the CLI's start-up errors, the queue, and a real browser."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import run_cli

from safe_diffusion.app.core import (
    MAX_SEED,
    DemoGenerator,
    Edit,
    guidance_terms,
    parse_edits,
    validate_request,
    warmup_note,
)
from safe_diffusion.common.errors import InputError

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "demo.png"
HARMLESS_PROMPT = "a red apple on a wooden table"


# -- validation ---------------------------------------------------------------------------------


def test_valid_request_is_normalised():
    r = validate_request("  a cat ", " ", "7", 4.0, "3", "MAX", "  ", "+sunglasses\n\n - beard ")
    assert (r.prompt, r.negative_prompt, r.seed, r.steps, r.guidance_scale, r.safety) == (
        "a cat",
        None,
        7,
        4,
        3.0,
        "max",
    )
    assert r.safety_concept is None  # blank means the paper's concept
    assert r.edits == (Edit("sunglasses"), Edit("beard", remove=True))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": ""}, "the prompt is empty"),
        ({"prompt": "   \n"}, "the prompt is empty"),
        ({"seed": -1}, "seed must be between 0 and"),
        ({"seed": MAX_SEED + 1}, "seed must be between 0 and"),
        ({"seed": None}, "seed is missing"),
        ({"seed": 1.5}, "seed must be a whole number"),
        ({"steps": 0}, "steps must be between 1 and 150"),
        ({"steps": 151}, "steps must be between 1 and 150"),
        ({"guidance_scale": 0.5}, "guidance scale must be between 1 and 30"),
        ({"guidance_scale": float("nan")}, "guidance scale must be a finite number"),
        ({"guidance_scale": "abc"}, "guidance scale must be a number"),
        ({"guidance_scale": 1.0}, "guidance scale must be above 1"),
        ({"safety": "extreme"}, "unknown safety preset 'extreme'"),
        ({"edits": "sunglasses"}, "edit line 1 ('sunglasses') must start with + (add the concept) or - (remove it)"),
        ({"edits": "+hat\n-"}, "edit line 2 ('-') names no concept"),
        ({"edits": "\n".join(f"+c{i}" for i in range(9))}, "at most 8 edit concepts"),
    ],
)
def test_invalid_requests_name_the_problem_in_one_line(kwargs, message):
    values = {"prompt": "a cat", "seed": 0, "steps": 4, "guidance_scale": 7.5, "safety": "medium", "edits": ""}
    values.update(kwargs)
    with pytest.raises(InputError) as err:
        validate_request(**values)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_guidance_scale_one_is_fine_without_guidance():
    assert validate_request("a cat", guidance_scale=1, safety="off").guidance_scale == 1.0


def test_parse_edits_signs():
    assert parse_edits("") == ()
    assert parse_edits("+a\n-b c") == (Edit("a"), Edit("b c", remove=True))


def test_guidance_terms_follow_preset_and_edits():
    from safe_diffusion.guidance import DEFAULT_SAFETY_CONCEPT, SafetyGuidance, SemanticGuidance

    assert guidance_terms(validate_request("a cat", safety="off")) == []
    sld, sega = guidance_terms(validate_request("a cat", safety="strong", safety_concept="rain", edits="+hat\n-dog"))
    assert sld == SafetyGuidance.from_preset("strong", concept="rain")
    assert isinstance(sega, SemanticGuidance) and sega.concepts == ["hat", "dog"] and sega.reverse == [False, True]
    (default,) = guidance_terms(validate_request("a cat", safety="weak"))
    assert default.concept == DEFAULT_SAFETY_CONCEPT
    assert "warm-up of 10 steps" in warmup_note(validate_request("a cat", steps=4))
    assert warmup_note(validate_request("a cat", steps=4, safety="max")) is None


# -- generation ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generator(tiny_checkpoint, tmp_path_factory):
    gen = DemoGenerator.load(str(tiny_checkpoint), device="cpu", output_root=tmp_path_factory.mktemp("demo-out"))
    yield gen
    gen.close()


def _pixels(image):
    import numpy as np

    return np.asarray(image).astype(int)


def test_generate_gives_both_images_from_one_seed_with_files(generator):
    seen = []
    request = validate_request(HARMLESS_PROMPT, seed=5, steps=3, safety="max", edits="+sunglasses")
    result = generator.generate(request, progress=lambda fraction, desc: seen.append((fraction, desc)))
    assert result.unguided.size == result.guided.size == (32, 32)
    assert abs(_pixels(result.unguided) - _pixels(result.guided)).max() > 0  # MAX acts from step 0

    # The unguided image is the model's own: the same as a request with guidance off.
    off = generator.generate(validate_request(HARMLESS_PROMPT, seed=5, steps=3, safety="off"))
    assert (_pixels(off.unguided) == _pixels(result.unguided)).all()
    assert (_pixels(off.guided) == _pixels(off.unguided)).all()

    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) >= 6
    assert any(d.startswith("guided image: step ") for _, d in seen)

    names = sorted(p.name for p in result.files)
    assert names == ["seed5-guided.png", "seed5-settings.json", "seed5-unguided.png"]
    assert all(p.is_file() for p in result.files)
    sidecar = json.loads(next(p for p in result.files if p.suffix == ".json").read_text())
    assert sidecar["prompt"] == HARMLESS_PROMPT and sidecar["seed"] == 5 and sidecar["steps"] == 3
    assert sidecar["safety"] == "max" and sidecar["edits"] == ["+sunglasses"]
    assert [g["type"] for g in sidecar["guidance"]] == ["SafetyGuidance", "SemanticGuidance"]
    assert sidecar["images"] == {"unguided": "seed5-unguided.png", "guided": "seed5-guided.png"}
    assert "torch" in sidecar["versions"]


def test_concurrent_requests_both_get_images_one_at_a_time(generator):
    active, peak, results, errors = [0], [0], {}, []
    original = generator.pipe.__class__.__call__
    guard = threading.Lock()

    class Counting(generator.pipe.__class__):
        def __call__(self, *args, **kwargs):
            with guard:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            try:
                time.sleep(0.05)
                return original(self, *args, **kwargs)
            finally:
                with guard:
                    active[0] -= 1

    cls = generator.pipe.__class__
    generator.pipe.__class__ = Counting
    try:

        def work(seed):
            try:
                results[seed] = generator.generate(validate_request(HARMLESS_PROMPT, seed=seed, steps=2))
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        generator.pipe.__class__ = cls
    assert not errors
    assert sorted(results) == [1, 2]
    assert all(r.guided is not None and r.unguided is not None for r in results.values())
    assert peak[0] == 1  # the lock keeps the device to one request


def test_handler_shows_messages_not_tracebacks(generator):
    pytest.importorskip("gradio")
    from safe_diffusion.app.ui import make_handler

    run = make_handler(generator)
    status, *_ = run("", "", 0, 3, 7.5, "medium", "", "", progress=lambda *a, **k: None)
    assert "the prompt is empty" in status and "Traceback" not in status
    status, *_ = run("a cat", "", 0, 3, 7.5, "medium", "", "beard", progress=lambda *a, **k: None)
    assert "must start with +" in status

    class Broken:
        model, lock = "broken", threading.Lock()

        def generate(self, request, progress=None):
            raise RuntimeError("CUDA out of memory\nmore detail\nand more")

    status, *_ = make_handler(Broken())("a cat", "", 0, 3, 7.5, "medium", "", "", progress=lambda *a, **k: None)
    assert status.endswith("CUDA out of memory") and "more detail" not in status

    status, unguided, _, settings, files = run(
        HARMLESS_PROMPT, "", 0, 2, 7.5, "off", "", "", progress=lambda *a, **k: None
    )
    assert status.startswith("**Done.**") and "both images are the same" in status
    assert unguided.size == (32, 32) and json.loads(settings)["seed"] == 0 and len(files) == 3


def test_registered_methods_join_the_demo(generator):
    """A method registered by name (as SAFREE registers itself) appears as a choice and guides the image."""
    gr = pytest.importorskip("gradio")
    from dataclasses import dataclass

    from safe_diffusion.app.ui import build_demo
    from safe_diffusion.guidance import SafetyGuidance
    from safe_diffusion.guidance.mitigation import MITIGATIONS, register_mitigation

    @dataclass(frozen=True)
    class RainAway(SafetyGuidance):
        concept: str = "rain"
        warmup_steps: int = 0

    def methods_widget(page):
        return next(b for b in page.blocks.values() if isinstance(b, gr.CheckboxGroup))

    widget = methods_widget(build_demo(generator))
    assert widget.visible and widget.choices == [("SAFREE", "safree")]  # the package registers SAFREE itself
    register_mitigation("rain-away", RainAway, label="Rain-away")
    try:
        widget = methods_widget(build_demo(generator))
        assert widget.visible and widget.choices == [("SAFREE", "safree"), ("Rain-away", "rain-away")]
        request = validate_request(HARMLESS_PROMPT, seed=3, steps=2, safety="off", methods=["Rain-Away"])
        assert request.methods == ("rain-away",) and guidance_terms(request) == [RainAway()]
        assert warmup_note(request) is None  # it guides from the first step
        result = generator.generate(request)
        assert result.settings["label"] == "Rain-away" and result.settings["methods"] == ["rain-away"]
        assert abs(_pixels(result.unguided) - _pixels(result.guided)).max() > 0
        with pytest.raises(InputError, match="unknown mitigation 'nope'"):
            validate_request(HARMLESS_PROMPT, methods=["nope"])
    finally:
        MITIGATIONS.unregister("rain-away")


# -- the command ------------------------------------------------------------------------------


def test_demo_command_rejects_a_missing_model_in_one_line(capsys):
    assert run_cli("demo", "--model", "/no/such/checkpoint") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model '/no/such/checkpoint' not found")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--host", "999.1.1.1"], "--host '999.1.1.1' is not an IP address or host name"),
        (["--host", "192.0.2.1"], "--host '192.0.2.1' is not an address of this machine"),
        (["--port", "70000"], "--port must be at most 65535"),
        (["--device", "banana"], "--device 'banana' is not a device"),
    ],
)
def test_demo_command_rejects_bad_serving_options_before_loading(capsys, tiny_checkpoint, args, message):
    assert run_cli("demo", "--model", str(tiny_checkpoint), *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    env.update(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_demo_command_stops_before_serving_when_the_model_does_not_load(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]})
    )
    port = _free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "safe_diffusion", "demo", "--model", str(broken), "--port", str(port)],
        check=False,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot load model '{broken}'"), proc.stderr
    assert "serving" not in proc.stdout + proc.stderr


def _serve(checkpoint, env=None):
    """The real CLI serving `checkpoint` on a free local port, once it answers: (process, url)."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "safe_diffusion", "demo", "--model", str(checkpoint), "--port", str(port)],
        env=env or _env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Ctrl-C reaches a server started from a terminal, also when the suite runs in the background
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the demo exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return proc, url
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the demo did not start serving within 180 s")
            time.sleep(0.5)
    except BaseException:
        _stop(proc)
        raise


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def demo_url(tiny_checkpoint):
    """The real CLI serving the tiny checkpoint on a free local port."""
    proc, url = _serve(tiny_checkpoint)
    try:
        yield url
    finally:
        _stop(proc)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_demo_removes_its_image_folder(tiny_checkpoint, tmp_path, sig):
    env = {**_env(), "TMPDIR": str(tmp_path)}  # where the demo makes its folder for generated images
    proc, _ = _serve(tiny_checkpoint, env)
    try:
        assert len(list(tmp_path.glob("safe-diffusion-demo-*"))) == 1  # there while it serves …
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            _stop(proc)
    assert "Traceback" not in output, output
    assert proc.returncode == 128 + sig, output  # gradio swallows Ctrl-C; the command still says it was stopped
    assert not list(tmp_path.glob("safe-diffusion-demo-*"))  # … and gone with it


@pytest.mark.slow
def test_queue_serves_two_simultaneous_clients(demo_url):
    gradio_client = pytest.importorskip("gradio_client")
    client = gradio_client.Client(demo_url, verbose=False)
    jobs = [
        client.submit(HARMLESS_PROMPT, "", seed, 2, 7.5, "medium", "", "", api_name="/generate") for seed in (11, 12)
    ]
    outputs = [job.result(timeout=120) for job in jobs]
    for seed, (status, unguided, guided, settings, files) in zip((11, 12), outputs):
        assert status.startswith("**Done.**"), status
        assert Path(unguided).is_file() and Path(guided).is_file()
        assert json.loads(settings)["seed"] == seed and len(files) == 3


# -- a real browser -----------------------------------------------------------------------------

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the browser test: run scripts/install-browser.sh)")
    pytest.skip(f"{reason}; run scripts/install-browser.sh to install it")


@pytest.fixture(scope="module")
def browser():
    chromium = os.environ.get("SAFE_DIFFUSION_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).is_file():
        _unavailable(f"Debian's chromium is not installed (no {chromium})")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright (Python) is not installed")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _open(browser, url):
    page = browser.new_page(viewport={"width": 1100, "height": 860})
    # Offline by construction: anything not served by the demo itself is refused.
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url) else route.abort())
    page.set_default_timeout(60_000)
    page.goto(url, wait_until="domcontentloaded")
    page.locator("#generate").wait_for()
    return page


def _set_steps(page, steps: int):
    box = page.locator("#steps input[type=number]")
    box.fill(str(steps))
    box.press("Enter")
    box.blur()


@pytest.mark.browser
@pytest.mark.slow
def test_browser_generates_side_by_side_and_reports_invalid_input(browser, demo_url):
    page = _open(browser, demo_url)
    status = page.locator("#status")

    # Invalid input: a message in the page, never a traceback.
    page.locator("#generate").click()
    page.get_by_text("the prompt is empty").first.wait_for()
    assert "Traceback" not in page.content()

    page.locator("#prompt textarea").fill(HARMLESS_PROMPT)
    page.locator("#seed input").fill("-5")
    page.locator("#generate").click()
    page.get_by_text("seed must be between 0 and").first.wait_for()

    page.locator("#random-seed").click()
    page.wait_for_function("() => Number(document.querySelector('#seed input').value) >= 0")
    page.locator("#seed input").fill("42")
    _set_steps(page, 4)
    page.locator("#safety").get_by_text("max", exact=True).click()

    page.locator("#generate").click()
    page.locator("#unguided img").wait_for(state="visible")
    page.locator("#guided img").wait_for(state="visible")
    status.get_by_text("Seed 42, 4 steps").wait_for()
    settings = page.locator("#settings").inner_text()
    assert '"seed": 42' in settings and '"safety": "max"' in settings
    files = page.locator("#files").inner_text().replace("\n", "")
    assert "seed42-settings.json" in files and "seed42-guided.png" in files, files

    if os.environ.get("SAFE_DIFFUSION_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.mouse.move(0, 0)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(SCREENSHOT), full_page=False)
        assert SCREENSHOT.stat().st_size < 200_000

    # The same page serves LEDITS++ sanitising in its own tab, on the same pipeline.
    page.get_by_role("tab", name="Sanitize").click()
    page.locator("#sanitize-input").wait_for(state="visible")
    assert page.locator("#sanitize-remove").inner_text().count("nudity") == 1
    page.close()


@pytest.mark.browser
@pytest.mark.slow
def test_two_browser_pages_clicking_at_once_both_get_images(browser, demo_url):
    pages = [_open(browser, demo_url) for _ in range(2)]
    for seed, page in enumerate(pages, start=7):
        page.locator("#prompt textarea").fill(HARMLESS_PROMPT)
        page.locator("#seed input").fill(str(seed))
        _set_steps(page, 3)
    for page in pages:
        page.locator("#generate").click()
    for seed, page in enumerate(pages, start=7):
        page.locator("#guided img").wait_for(state="visible")
        page.locator("#unguided img").wait_for(state="visible")
        page.locator("#status").get_by_text(f"Seed {seed}, 3 steps").wait_for()
        page.close()


def test_the_sanitize_tab_answers_a_missing_image_with_one_value_per_output():
    """The click handler's refusal fills the four outputs (status, after, mask, settings), no more: it returned
    five, and Gradio warned "returned too many output values" on every click without an image."""
    from safe_diffusion.app.sanitize_tab import make_sanitize_handler

    handler = make_sanitize_handler(None)
    out = handler(None, ["nudity"], "", "", 3, 5.0, 0.9, 0, True, progress=lambda *a, **k: None)
    assert len(out) == 4 and "upload an image first" in out[0]
