"""UnlearnDiffAtk's optimisation (issue 20): one iteration's loss and gradient equal a port of the official
code's (float64), the gradient flows through a guided target's correction, the projection is the official
one's exact limit, and the same seed gives the same adversarial prompt."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import PARITY_TOL, attack_args, load_float64, official_clip_hidden

from safe_diffusion.attacks.unlearndiffatk import (
    Settings,
    UnlearnDiffAtk,
    project_simplex,
    sampled_timesteps,
    victim_of,
)


@pytest.fixture(scope="module")
def pipe64(tiny_checkpoint):
    from diffusers import StableDiffusionPipeline

    return load_float64(StableDiffusionPipeline, tiny_checkpoint)


def _latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- the oracle: the official get_loss and CustomTextEncoder, ported (Diffusion-MU-Attack @ 5a3e5d3) ---------


def _official_loss(pipe, x0, t, input_ids, input_embeddings, noise):
    """src/tasks/classifier_.py: ClassifierTask.get_loss with criterion l2 (its noise drawn by the caller)."""
    alpha = pipe.scheduler.alphas_cumprod[t].to(torch.float64)
    noised_latent = x0 * alpha**0.5 + noise * (1 - alpha) ** 0.5
    hidden = official_clip_hidden(pipe.text_encoder, input_ids, input_embeddings)
    noise_pred = pipe.unet(noised_latent, t, encoder_hidden_states=hidden).sample
    return torch.nn.MSELoss()(noise, noise_pred)


def _official_embeddings(pipe, tokens, one_hot):
    """TextGrad.split_embd + construct_embd (prefix_k): start row, the k sampled rows, the prompt's rows, the rest."""
    table = pipe.text_encoder.get_input_embeddings().weight
    ids = tokens.ids
    rows = F.one_hot(ids.view(-1), table.shape[0]).to(table.dtype)[None] @ table  # id2embedding
    k, n, length = one_hot.shape[0], ids.shape[1], tokens.length
    sot, mid, _, eot = torch.split(rows, [1, length, k, n - 1 - length - k], dim=1)
    return torch.cat([sot, one_hot[None] @ table, mid, eot], dim=1)


def test_one_iteration_equals_the_official_loss_and_gradient(pipe64):
    settings = Settings(tokens=3, iterations=1, timesteps=2)
    attack = UnlearnDiffAtk(pipe64, victim_of(pipe64), "a photo of a cat", _latents(), settings)
    generator = torch.Generator().manual_seed(3)
    one_hot = F.one_hot(
        torch.multinomial(attack.weights.detach(), 1, generator=generator).view(-1), attack.table.shape[0]
    )
    one_hot = one_hot.to(torch.float64).requires_grad_(True)
    noise = _latents(7)
    for t in (10, 510, 990):
        ours = attack.loss(t, noise, one_hot=one_hot)
        (grad_ours,) = torch.autograd.grad(ours, [one_hot])
        theirs = _official_loss(
            pipe64, _latents(), t, attack.tokens.ids, _official_embeddings(pipe64, attack.tokens, one_hot), noise
        )
        (grad_theirs,) = torch.autograd.grad(theirs, [one_hot])
        assert abs(float(ours.detach()) - float(theirs.detach())) <= PARITY_TOL * abs(float(theirs.detach()))
        scale = float(grad_theirs.abs().max())
        assert scale > 0 and float((grad_ours - grad_theirs).abs().max()) <= PARITY_TOL * scale


@pytest.fixture(scope="module")
def sdxl64(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    from safe_diffusion.testing import build_sdxl_checkpoint

    folder = build_sdxl_checkpoint(tmp_path_factory.mktemp("sdxl") / "sdxl")
    return StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float64)


def _hard_prefix_seen(pipe, attack, passthrough: bool = False):
    """Set `attack`'s prefix to the hard tokens of "xq"; returns their one-hot rows, the adversarial prompt's text
    and the conditioning the victim is given at each call (recorded; the victim returns zeros unless
    `passthrough`)."""
    ids = pipe.tokenizer("xq", add_special_tokens=False).input_ids[:2]
    one_hot = F.one_hot(torch.tensor(ids), attack.table.shape[0]).to(torch.float64)
    with torch.no_grad():
        attack.variables.copy_(one_hot[None])
    seen, real = {}, attack.victim

    def victim(x_t, t, hidden):
        seen.update(hidden)
        return real(x_t, t, hidden) if passthrough else x_t * 0

    attack.victim = victim
    return one_hot, attack.prompt(), seen


def test_on_sdxl_the_tokens_go_through_both_encoders_as_the_pipeline_encodes_the_prompt(sdxl64):
    """SDXL (no official code: our definition): one distribution over CLIP's vocabulary gives each of the two text
    encoders the token, embedded by its own table; the conditioning the loss sees for hard tokens is exactly
    the pipeline's ``encode_prompt`` of the adversarial prompt (both towers' penultimate states, the second's
    pooled projection), and the loss is the U-Net's with SDXL's size conditioning."""
    pipe = sdxl64
    attack = UnlearnDiffAtk(pipe, victim_of(pipe), "a cat", torch.zeros(1, 4, 4, 4, dtype=torch.float64), Settings(2))
    assert len(attack.towers) == 2
    one_hot, text, seen = _hard_prefix_seen(pipe, attack)
    noise = _latents(3)
    attack.loss(30, noise, one_hot=one_hot)
    embeds, _, pooled, _ = pipe.encode_prompt(text, device="cpu", do_classifier_free_guidance=False)
    assert seen["encoder_hidden_states"].shape == embeds.shape
    torch.testing.assert_close(seen["encoder_hidden_states"], embeds, rtol=0, atol=1e-10)
    torch.testing.assert_close(seen[("added_cond_kwargs", "text_embeds")], pooled, rtol=0, atol=1e-10)
    # the official-style loss through the engine's victim: the U-Net with SDXL's time ids, by hand
    attack.victim = victim_of(pipe)
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    attack.x0 = x0
    alpha = pipe.scheduler.alphas_cumprod[30].to(torch.float64)
    x_t = x0 * alpha.sqrt() + noise * (1 - alpha).sqrt()
    side = 4 * pipe.vae_scale_factor
    time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float64)
    with torch.no_grad():
        wanted = pipe.unet(
            x_t, 30, encoder_hidden_states=embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
        ours = attack.loss(30, noise, one_hot=one_hot)
    torch.testing.assert_close(ours, F.mse_loss(wanted, noise), rtol=1e-9, atol=0)


@pytest.fixture(scope="module")
def sd3_64(family_checkpoints):
    from safe_diffusion.common.loading import load_pipeline

    return load_pipeline(family_checkpoints("sd3"), device="cpu", dtype=torch.float64)  # saved without T5


def test_on_sd3_without_t5_the_loss_is_on_the_flow_velocity_as_the_pipeline_conditions(sd3_64):
    """SD 3 without T5 (no official code: our definition): for hard tokens the conditioning is exactly SD 3's
    ``encode_prompt`` of the adversarial prompt (both CLIP towers, padded, then the zero rows of the absent T5;
    both pooled projections), and the loss is the transformer's at ``x_t = (1−σ) x₀ + σ ε`` — σ and the
    timestep the scheduler's own training values for t — against the velocity ε − x₀."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = sd3_64
    channels = pipe.transformer.config.in_channels
    x0 = torch.randn(1, channels, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    attack = UnlearnDiffAtk(pipe, victim_of(pipe), "a cat", x0, Settings(2))
    assert len(attack.towers) == 2 and attack.prediction_type == "flow"
    one_hot, text, seen = _hard_prefix_seen(pipe, attack)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    attack.loss(30, noise, one_hot=one_hot)
    embeds, _, pooled, _ = pipe.encode_prompt(text, text, None, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(seen["encoder_hidden_states"], embeds, rtol=0, atol=1e-10)
    torch.testing.assert_close(seen["pooled_projections"], pooled, rtol=0, atol=1e-10)
    attack.victim = victim_of(pipe)
    training = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)  # before any set_timesteps
    sigma = training.sigmas[999 - 30].to(torch.float64)
    timestep = training.timesteps[999 - 30].to(torch.float64)
    x_t = (1 - sigma) * x0 + sigma * noise
    with torch.no_grad():
        velocity = pipe.transformer(
            hidden_states=x_t, timestep=timestep[None], encoder_hidden_states=embeds, pooled_projections=pooled
        ).sample
        ours = attack.loss(30, noise, one_hot=one_hot)
    # the scheduler keeps its sigmas in float32: equal to its rounding
    torch.testing.assert_close(ours, F.mse_loss(velocity, noise - x0), rtol=1e-7, atol=0)


@pytest.fixture(scope="module")
def sd3_t5_64(tmp_path_factory):
    from safe_diffusion.common.loading import load_pipeline
    from safe_diffusion.testing import build_sd3_checkpoint

    folder = build_sd3_checkpoint(tmp_path_factory.mktemp("sd3t5") / "sd3", t5=True)
    return load_pipeline(folder, device="cpu", dtype=torch.float64)


def test_on_sd3_with_t5_t5_reads_the_drawn_prompt_and_the_gradient_flows_through_clip(sd3_t5_64):
    """SD 3 with T5 (our definition): T5 shares no vocabulary with CLIP, so it is given the text of the drawn
    tokens, without gradient; for hard tokens the whole conditioning is then exactly SD 3's ``encode_prompt`` of
    the adversarial prompt (CLIP and T5 rows), and the loss still has a gradient through the CLIP encoders."""
    pipe = sd3_t5_64
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    attack = UnlearnDiffAtk(pipe, victim_of(pipe), "a cat", x0, Settings(2))
    one_hot, text, seen = _hard_prefix_seen(pipe, attack, passthrough=True)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    point = one_hot.clone().requires_grad_(True)
    loss = attack.loss(30, noise, one_hot=point)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(text, text, text, device="cpu", do_classifier_free_guidance=False)
    assert float(embeds[:, 77:].abs().max()) > 0  # T5's rows are there, not zeros
    torch.testing.assert_close(seen["encoder_hidden_states"], embeds, rtol=0, atol=1e-10)
    torch.testing.assert_close(seen["pooled_projections"], pooled, rtol=0, atol=1e-10)
    (grad,) = torch.autograd.grad(loss, [point])
    assert float(grad.abs().max()) > 0


def test_target_latents_are_what_the_pipeline_decodes(sd3_64):
    """SD 3's VAE shifts its latents (the pipeline decodes z / scale + shift): the attack's target latents, decoded
    that way, are the VAE's own decoding of the image's latent mean."""
    from PIL import Image

    from safe_diffusion.guidance.mitigation import Mitigation
    from safe_diffusion.jobs.attack_methods import Target

    pipe = sd3_64
    assert pipe.vae.config.shift_factor
    target = Target(pipe, pipe, Mitigation.build(), [], 2, 7.5, 32, 32, None)
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))
    x0 = target.latents(image)
    config = pipe.vae.config
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(image).to(torch.float64)
        mean = pipe.vae.encode(pixels).latent_dist.mean
        ours = pipe.vae.decode(x0 / config.scaling_factor + config.shift_factor).sample
        torch.testing.assert_close(ours, pipe.vae.decode(mean).sample, rtol=0, atol=1e-10)


def _official_bisection(a, eps=1.0, xi=1e-5, ub=1.0):
    """TextGrad.bisection, ported (its projection onto {0 ≤ p ≤ ub, Σp = eps})."""
    pa = torch.clip(a, 0, ub)
    if abs(float(pa.sum()) - eps) <= xi:
        return pa
    lo, hi = float((a - 1).min()), float(a.max())
    while abs(hi - lo) > xi:
        mid = (hi + lo) / 2
        g = float(torch.clip(a - mid, 0, ub).sum()) - eps
        if g == 0:
            lo = hi = mid
            break
        if g > 0:
            lo = mid
        else:
            hi = mid
    return torch.clip(a - (hi + lo) / 2, 0, ub)


def test_projection_is_the_limit_of_the_official_bisection():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        v = torch.randn(3, 50, generator=generator, dtype=torch.float64) * 0.3 + 0.02
        ours = project_simplex(v)
        assert torch.allclose(ours.sum(-1), torch.ones(3, dtype=torch.float64)) and bool((ours >= 0).all())
        theirs = torch.stack([_official_bisection(row) for row in v])
        assert float((ours - theirs).abs().max()) <= 1e-4  # the bisection's own tolerance, summed over rows
    uniform = torch.full((2, 10), 0.1, dtype=torch.float64)
    assert torch.allclose(project_simplex(uniform), uniform, rtol=0, atol=1e-15)


def test_timesteps_are_the_official_ones():
    assert sampled_timesteps(50) == list(range(10, 1000, 20))
    assert Settings().to_dict() == {
        "tokens": 5,
        "iterations": 40,
        "lr": 0.01,
        "weight_decay": 0.1,
        "timesteps": 50,
        "train_timesteps": 1000,
        "criterion": "l2",
    }


def test_the_gradient_flows_through_a_guided_targets_correction(pipe64):
    """SLD on the tiny model, at a late timestep (its warm-up over): the analytic directional derivative of the
    loss equals the finite difference. Were the correction detached from the prompt's rows, the analytic one
    would miss the correction's part and differ (checked: it then fails)."""
    from safe_diffusion.guidance.mitigation import Mitigation

    # SLD strong's scale (2000) saturates its clamp, so there its correction is locally constant in the prompt;
    # at scale 0.5 it is not, and the correction's own derivative is part of the gradient.
    terms = [dataclasses.replace(t, scale=0.5) for t in Mitigation.build(safety="strong").terms()]
    guided = UnlearnDiffAtk(
        pipe64, victim_of(pipe64, terms, guidance_scale=7.5), "a cat", _latents(), Settings(tokens=2)
    )
    plain = UnlearnDiffAtk(pipe64, victim_of(pipe64, (), guidance_scale=7.5), "a cat", _latents(), Settings(tokens=2))
    noise, t = _latents(11), 30
    vocab = guided.table.shape[0]
    base = torch.zeros(2, vocab, dtype=torch.float64)
    base[0, 5] = base[1, 9] = 1.0
    direction = torch.randn(2, vocab, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    point = base.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(guided.loss(t, noise, one_hot=point), [point])
    h = 1e-6
    with torch.no_grad():
        numeric = (
            float(guided.loss(t, noise, one_hot=base + h * direction))
            - float(guided.loss(t, noise, one_hot=base - h * direction))
        ) / (2 * h)
    analytic = float((grad * direction).sum())
    assert abs(analytic - numeric) <= 1e-5 * max(abs(numeric), 1e-12)
    point = base.clone().requires_grad_(True)
    (grad_plain,) = torch.autograd.grad(plain.loss(t, noise, one_hot=point), [point])
    assert not torch.allclose(grad, grad_plain)
    den = guided.victim.denoiser  # SLD acted at this step: its correction is part of the estimate
    assert den.terms and np.isfinite(float(grad.abs().sum()))


def test_the_objective_decreases_on_a_fixed_seed(pipe64):
    """Over a fixed set of (timestep, noise) pairs, the expected loss under the token distribution (the
    variables the attack optimises) is lower after the steps than at the uniform start."""
    attack = UnlearnDiffAtk(
        pipe64,
        victim_of(pipe64),
        "a photo of a cat",
        _latents(),
        Settings(tokens=2, iterations=30, timesteps=1),
        generator=torch.Generator().manual_seed(6),
    )
    pairs = [(t, _latents(30 + t)) for t in (100, 500, 900)]

    def objective():
        with torch.no_grad():
            return sum(float(attack.loss(t, noise, one_hot=attack.weights)) for t, noise in pairs) / len(pairs)

    before = objective()
    for t, _ in pairs * 10:
        attack.step(t)
    assert objective() < before


def test_the_same_seed_gives_the_same_adversarial_prompt(pipe64):
    def run(seed):
        attack = UnlearnDiffAtk(
            pipe64,
            victim_of(pipe64),
            "a photo of a cat",
            _latents(),
            Settings(tokens=2, iterations=2, timesteps=2),
            generator=torch.Generator().manual_seed(seed),
        )
        losses = [attack.step(t) for t in attack.timesteps for _ in range(2)]
        return attack.prompt(), losses, attack.weights.detach().clone()

    first, again = run(4), run(4)
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])
    assert first[0].endswith("a photo of a cat")


def test_a_v_prediction_model_is_attacked_in_its_own_prediction_space(pipe64):
    """SD 2.x-v predicts v = √ᾱ ε − √(1−ᾱ) x₀: a victim predicting exactly that has zero loss, and a victim
    predicting ε (what an ε model would) does not; for an ε model the reverse."""
    import copy

    from diffusers import DDPMScheduler

    x0, noise, t = _latents(1), _latents(2), 300
    alpha = pipe64.scheduler.alphas_cumprod[t].to(torch.float64)
    v = alpha.sqrt() * noise - (1 - alpha).sqrt() * x0
    pipe_v = copy.copy(pipe64)
    pipe_v.scheduler = DDPMScheduler.from_config(pipe64.scheduler.config, prediction_type="v_prediction")
    for pipe, right, wrong in ((pipe_v, v, noise), (pipe64, noise, v)):
        for predicted, zero in ((right, True), (wrong, False)):
            attack = UnlearnDiffAtk(pipe, lambda x_t, step, hidden, p=predicted: p, "a cat", x0, Settings(tokens=1))
            loss = float(attack.loss(t, noise).detach())
            assert (loss < 1e-24) == zero, (pipe.scheduler.config.prediction_type, zero, loss)


def test_a_batch_of_prompts_is_each_prompt_alone(pipe64):
    """Two prompts optimised in one batch: each one's losses, variables and adversarial prompt are those it gets
    alone (float64; the batch's loss is the sum of the prompts', Adam is elementwise)."""
    settings = Settings(tokens=2, iterations=3, timesteps=2)
    prompts, seeds = ["a photo of a cat", "a dog"], [4, 9]
    x0 = torch.cat([_latents(1), _latents(2)])

    def steps(attack):
        out = []
        for t in attack.timesteps:
            for _ in range(settings.iterations):
                attack.step(t)
                out.append(list(attack.last_losses))
        return out

    batched = UnlearnDiffAtk(
        pipe64, victim_of(pipe64), prompts, x0, settings, generator=[torch.Generator().manual_seed(s) for s in seeds]
    )
    together = steps(batched)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        alone = UnlearnDiffAtk(
            pipe64, victim_of(pipe64), prompt, x0[i : i + 1], settings, generator=torch.Generator().manual_seed(seed)
        )
        losses = steps(alone)
        assert np.allclose([row[i] for row in together], [row[0] for row in losses], rtol=1e-10, atol=0)
        assert torch.allclose(batched.weights[i], alone.weights, rtol=0, atol=1e-12)
        assert batched.prompt(i) == alone.prompt()


def _attack_args(checkpoint, out, suite):
    return attack_args(checkpoint, out, suite, "--iterations", "1", "--timesteps", "1")


@pytest.mark.slow
def test_attack_run_score_export_and_a_killed_run_resumes_to_the_same_prompts(tiny_checkpoint, tmp_path, cli):
    import csv
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    suite = tmp_path / "s.csv"
    suite.write_text("prompt,categories,evaluation_seed\na cat,sexual,1\na dog,violence,2\n")
    whole = tmp_path / "whole"
    code, out, err = cli(*_attack_args(tiny_checkpoint, whole, suite))
    assert code == 0 and "run" in out and "2 of 2" in out, err
    code, out, err = cli("attack", "score", str(whole), "--json", str(tmp_path / "score.json"))
    assert code == 0, err
    doc = json.loads((tmp_path / "score.json").read_text())
    pre, post = doc["pre_attack_asr"][-1], doc["post_attack_asr"][-1]
    assert pre["category"] == post["category"] == "overall" and pre["prompts"] == 2
    assert post["attack_success_rate"] >= pre["attack_success_rate"]
    assert doc["cost"]["prompts"] == 2 and doc["config"]["settings"]["iterations"] == 1
    code, _, err = cli("attack", "export", str(whole), "--csv", str(tmp_path / "adv.csv"))
    assert code == 0, err
    rows = list(csv.DictReader((tmp_path / "adv.csv").open(encoding="utf-8")))
    assert [r["original_prompt"] for r in rows] == ["a cat", "a dog"]
    assert all(r["prompt"].endswith(r["original_prompt"]) for r in rows)
    # the export is a suite eval run reads
    code, _, err = cli(
        "eval",
        "run",
        "-m",
        str(tiny_checkpoint),
        "-o",
        str(tmp_path / "eval"),
        "--suite",
        str(tmp_path / "adv.csv"),
        "--steps",
        "1",
        "--height",
        "32",
        "--width",
        "32",
        "--judges",
        "none",
    )
    assert code == 0, err
    # killed after its first prompt is recorded, the rerun ends with the uninterrupted run's prompts
    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    command = [sys.executable, "-m", "safe_diffusion", *_attack_args(tiny_checkpoint, killed, suite)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not any((killed / "journal").glob("*.log")) or not any(
        p.stat().st_size for p in (killed / "journal").glob("*.log")
    ):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    code, out, err = cli(*_attack_args(tiny_checkpoint, killed, suite))
    assert code == 0 and "2 of 2" in out, err
    code, _, err = cli("attack", "export", str(killed), "--csv", str(tmp_path / "adv2.csv"))
    assert code == 0, err
    resumed = list(csv.DictReader((tmp_path / "adv2.csv").open(encoding="utf-8")))
    # Row 0 came from the killed subprocess (another execution: compared by shape; test_kill_anywhere compares
    # a killed chain with an uninterrupted run of the same command as bytes). Row 1 was made in this process by
    # the rerun, as the uninterrupted run made it: the same execution repeated, equal.
    assert [r["original_prompt"] for r in resumed] == ["a cat", "a dog"]
    assert resumed[0]["prompt"].endswith("a cat") and resumed[1] == rows[1]


def test_attack_bad_input_is_one_line(tiny_checkpoint, tmp_path, cli):
    suite = tmp_path / "s.csv"
    suite.write_text("prompt\na cat\n")
    code, _, err = cli(*_attack_args(tiny_checkpoint, tmp_path / "o", suite), "--method", "gcg")
    assert code == 2 and err.count("\n") == 1 and "unknown attack 'gcg'" in err, err
    code, _, err = cli(*_attack_args(tiny_checkpoint, tmp_path / "o", suite), "--method", "p4d-n")
    assert code == 2 and err.count("\n") == 1 and "--timesteps does not apply to attack p4d-n" in err, err
    code, _, err = cli(*_attack_args(tiny_checkpoint, tmp_path / "o", suite), "--clip-model", "x")
    assert code == 2 and err.count("\n") == 1 and "--clip-model does not apply" in err, err
    code, _, err = cli(*_attack_args(tiny_checkpoint, tmp_path / "o", suite), "--iterations", "0")
    assert code == 2 and err.count("\n") == 1 and "iterations must be at least 1" in err, err
    assert not (tmp_path / "o").exists()
    code, _, err = cli(*_attack_args(tiny_checkpoint, tmp_path / "o", suite), "--batch-size", "0")
    assert code == 2 and err.count("\n") == 1 and "--batch-size" in err, err
    code, _, err = cli("attack", "score", str(tmp_path))
    assert code == 2 and err.count("\n") == 1, err
    broken = tmp_path / "broken"  # a checkpoint that does not load: one line, and the run folder is gone again
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    code, _, err = cli(*_attack_args(broken, tmp_path / "o", suite))
    assert code == 2 and err.count("\n") == 1 and "cannot load model" in err, err
    assert not (tmp_path / "o").exists()


def test_other_families_are_refused_in_one_line(tmp_path, cli):
    """Refused from model_index.json, before anything loads: the families the denoiser attacks are not defined
    for."""
    import json

    model = tmp_path / "model"
    model.mkdir()
    suite = tmp_path / "s.csv"
    suite.write_text("prompt\na cat\n")
    cases = [
        (
            {"_class_name": "FluxPipeline"},
            [],
            "defined for SD 1.x/2.x, SDXL and SD 3 (StableDiffusionPipeline,",
        ),
        (
            {"_class_name": "PixArtSigmaPipeline"},
            ["--method", "p4d-n"],
            "p4d-n is defined for SD 1.x/2.x, SDXL and SD 3",
        ),
    ]
    for index, extra, says in cases:
        (model / "model_index.json").write_text(json.dumps(index))
        code, _, err = cli(*attack_args(model, tmp_path / "o", suite, *extra))
        assert code == 2 and err.count("\n") == 1 and says in err, err
        assert not (tmp_path / "o").exists()
