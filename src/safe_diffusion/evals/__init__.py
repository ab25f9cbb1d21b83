"""The evaluation harness: prompt suites, a crash-safe run store, generation and judging stages, metrics, reports.

* :mod:`.suites` — the registry of prompt suites (I2P, Ring-A-Bell, MMA-Diffusion, UnlearnDiffAtk, P4D,
  any CSV/Parquet) and their loader;
* :mod:`.config` — the typed, versioned run config the library builds;
* :mod:`.store` — one folder per run, safe on shared network file systems (a :mod:`safe_diffusion.records.store`);
* :mod:`.runner` — the generate and judge stages (deterministic, sharded, resumable);
* :mod:`.metrics` / :mod:`.results` — unsafe image rate, attack success rate, bootstrap intervals, the
  I2P paper's metrics, and the versioned results JSON;
* :mod:`.report` — HTML and Markdown reports across runs;
* :mod:`.quality` — CLIP score, FID and KID (torchmetrics), a package; :mod:`.coco` — COCO captions as prompts;
* :mod:`.references` — the published I2P figures, shaped like our score rows.

See docs/evaluation.md.
"""
