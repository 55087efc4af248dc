"""Evaluation harness: perplexity, LAMBADA, multiple choice and generation tasks, scored as published numbers are.

- ``tasks.py`` task files (TOML/YAML) and data-directory resolution; ``formats.py`` data adapters and templates;
- ``loglik.py`` the batched scoring engine (shared by ``sparselm eval`` and the lm-evaluation-harness adapter);
- ``metrics.py`` the metrics; ``harness.py`` the runner and its JSON/Markdown reports; ``compare.py`` tables and
  plots across checkpoints; ``lm_eval_adapter.py`` the ``sparselm`` model class for lm-evaluation-harness.
"""
