"""AdamW's implementations: the fused kernel takes the foreach step, a resumed optimizer keeps the configured one."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from sparselm.config import Config, load_config
from sparselm.errors import ConfigError
from sparselm.optim import build_optimizer, implementation_of
from sparselm.train.trainer import build_model

MODEL = [
    "model.vocab_size=256",
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.d_ff=64",
    "moe.num_experts=4",
    "optim.expert_lr_scale=2",
]


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))
    optimizer.zero_grad()
    model(x).logits.logsumexp(-1).mean().backward()
    optimizer.step()


def _models_and_optimizers(cfg: Config, *implementations: str) -> list[tuple[torch.nn.Module, torch.optim.Optimizer]]:
    torch.manual_seed(0)
    base = build_model(cfg)
    out = []
    for implementation in implementations:
        model = copy.deepcopy(base)
        out.append((model, build_optimizer(model, dataclasses.replace(cfg.optim, implementation=implementation))))
    return out


def test_auto_is_fused_on_cpu_and_foreach_when_asked() -> None:
    cfg = load_config(None, MODEL)
    (_, auto), (_, fused), (_, foreach) = _models_and_optimizers(cfg, "auto", "fused", "foreach")
    assert implementation_of(auto) == implementation_of(fused) == "fused"
    assert implementation_of(foreach) == "foreach"
    with pytest.raises(ConfigError, match="optim.implementation"):
        load_config(None, ["optim.implementation=fast"])


def test_fused_step_matches_foreach_step() -> None:
    """One step (weight decay, two learning rates, every parameter shape of an MoE model) from the same gradients.

    Not bitwise: the fused kernel evaluates the same update per element with its operations associated differently
    (bias corrections, lerp of the first moment), so results differ in the last bits. Measured: at most 3.7e-9
    absolute on weights of ~0.02 (a few fp32 ulps, about 1e-6 of the learning rate). The tolerance, 4e-7 relative
    (~4 ulps) plus 1e-5 of the learning rate absolute for entries near zero, is 10-100x tighter than any real
    difference in the update rule would produce (e.g. a missing bias correction changes entries by ~lr)."""
    cfg = load_config(None, [*MODEL, "optim.lr=1e-3"])
    (fused_model, fused), (foreach_model, foreach) = _models_and_optimizers(cfg, "fused", "foreach")
    _step(fused_model, fused, seed=1)
    _step(foreach_model, foreach, seed=1)
    changed = 0
    for (name, a), (_, b) in zip(fused_model.named_parameters(), foreach_model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=4e-7, atol=1e-5 * cfg.optim.lr, msg=name)
        sa, sb = fused.state[a], foreach.state[b]
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=4e-7, atol=1e-12, msg=name)
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=4e-7, atol=1e-15, msg=name)
        changed += int(not torch.equal(a, b))
    assert changed > 0  # the two kernels really ran (else this test compares foreach with itself)


def test_loaded_state_keeps_the_configured_implementation() -> None:
    """Optimizer.load_state_dict copies the saved group settings, fused/foreach included: a foreach checkpoint
    resumed with a fused config must run fused (and the reverse), and continue exactly where the saver would."""
    cfg = load_config(None, MODEL)
    (model_a, foreach), (model_b, fused) = _models_and_optimizers(cfg, "foreach", "fused")
    _step(model_a, foreach, seed=1)
    model_b.load_state_dict(model_a.state_dict())
    fused.load_state_dict(foreach.state_dict())
    assert implementation_of(fused) == "fused"
    foreach.load_state_dict(fused.state_dict())
    assert implementation_of(foreach) == "foreach"
    # A fused optimizer resumed from its own state steps bitwise as the uninterrupted one.
    (model_c, fused_c), (model_d, fused_d) = _models_and_optimizers(cfg, "fused", "fused")
    _step(model_c, fused_c, seed=1)
    model_d.load_state_dict(model_c.state_dict())
    fused_d.load_state_dict(copy.deepcopy(fused_c.state_dict()))
    _step(model_c, fused_c, seed=2)
    _step(model_d, fused_d, seed=2)
    for (name, a), (_, b) in zip(model_c.named_parameters(), model_d.named_parameters(), strict=True):
        assert torch.equal(a, b), name
