"""The IBP prior: hand-checked value and gradient, and the loss over a model's routers."""

from __future__ import annotations

import math

import pytest
import torch

from polytropon import PolyConfig, get_peft_model, ibp_loss
from polytropon.toolkit.priors import ibp_log_prior
from polytropon.variants import unique_routers


def _routers(model, adapter="default"):
    return unique_routers([layer.adapters[adapter].poly_router for _, layer in model.poly_layers()])


# ---------------------------------------------------------------------- IBP prior
def test_ibp_log_prior_hand_checked():
    # N = 2 tasks, K = 1 skill, alpha = 1 (so alpha/K = 1); both tasks use the skill with p = 0.25 -> m = 0.5
    logit = torch.full((2, 1), math.log(0.25 / 0.75), requires_grad=True)
    log_p = ibp_log_prior(torch.sigmoid(logit), alpha=1.0)
    expected = math.log(1.0) + math.lgamma(0.5 + 1) + math.lgamma(2 - 0.5 + 1) - math.lgamma(2 + 1 + 1)
    assert abs(log_p.item() - expected) < 1e-6
    assert abs(log_p.item() - (-1.6278588)) < 1e-6  # lgamma(1.5) + lgamma(2.5) - log(6)
    (-log_p).backward()
    # d(-log p)/dm = digamma(N - m + 1) - digamma(m + a) = digamma(2.5) - digamma(1.5) = 1/1.5;
    # dm/dlogit = p (1 - p) = 0.1875  ->  0.125, positive: the prior pushes a rarely used skill further down
    torch.testing.assert_close(logit.grad, torch.full((2, 1), 0.125), atol=1e-6, rtol=1e-6)


def test_ibp_log_prior_prefers_sparse_or_shared_skills():
    # 4 tasks, 2 skills: skill 0 used by all, skill 1 by none  vs  every task half-using both
    structured = torch.tensor([[1.0, 0.0]] * 4).clamp(1e-4, 1 - 1e-4)
    diffuse = torch.full((4, 2), 0.5)
    assert ibp_log_prior(structured, alpha=1.0) > ibp_log_prior(diffuse, alpha=1.0)
    with pytest.raises(ValueError, match="alpha"):
        ibp_log_prior(diffuse, alpha=0.0)


def test_ibp_loss_over_model_routers(randomize_, small_llama):
    model = get_peft_model(small_llama(), PolyConfig(n_tasks=3, n_skills=4, n_splits=2, router_granularity="block"))
    randomize_(model)
    routers = _routers(model)
    manual = []
    for r in routers:
        probs = torch.sigmoid(r.module_logits.detach()).view(3, 2, 4)
        for q in range(2):
            manual.append(-ibp_log_prior(probs[:, q], alpha=2.0))
    loss = ibp_loss(model, alpha=2.0)
    torch.testing.assert_close(loss, torch.stack(manual).mean())
    torch.testing.assert_close(ibp_loss(model, alpha=2.0, reduction="sum"), torch.stack(manual).sum())
    loss.backward()
    assert all(r.module_logits.grad is not None and r.module_logits.grad.abs().sum() > 0 for r in routers)
    assert all(p.grad is None for n, p in model.named_parameters() if "poly_lora" in n)
    fixed = get_peft_model(small_llama(), PolyConfig(poly_type="private", n_tasks=2, n_skills=2))
    with pytest.raises(ValueError, match="no learned router"):
        ibp_loss(fixed)
    with pytest.raises(ValueError, match="reduction"):
        ibp_loss(model, reduction="max")
