"""Task -> skill routers."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

#: Added to the per-split sum of routing weights before normalising (as PEFT and the papers' code do).
EPS = 1e-12


class PolyRouter(nn.Module):
    """Learned task -> skill allocation of one adapted layer (Ponti et al. 2022; Caccia et al. 2022).

    Holds ``module_logits`` of shape ``(n_tasks, n_splits * n_skills)``, initialised uniform(-1e-3, 1e-3).
    For task ids ``t`` (shape ``(n,)``) it returns routing weights ``w`` of shape ``(n, n_splits, n_skills)``::

        z = logits[t].view(n, n_splits, n_skills)
        p = RelaxedBernoulli(temperature=1, logits=z).rsample()   # training (one sample per row)
        p = sigmoid(z)                                            # eval
        w = p / (p.sum(-1, keepdim=True) + EPS)                   # each split's weights sum to 1

    Args:
        n_tasks: number of tasks (rows).
        n_skills: number of skills per split.
        n_splits: number of splits (MHR heads); 1 for Poly.
        reset: draw the initial logits now (``False`` leaves them for the owner to draw with :meth:`reset`).
    """

    def __init__(self, n_tasks: int, n_skills: int, n_splits: int = 1, reset: bool = True) -> None:
        super().__init__()
        self.n_tasks = n_tasks
        self.n_skills = n_skills
        self.n_splits = n_splits
        self.module_logits = nn.Parameter(torch.empty(n_tasks, n_splits * n_skills))
        if reset:
            self.reset()

    def reset(self) -> None:
        """Re-draw the logits from uniform(-1e-3, 1e-3)."""
        with torch.no_grad():
            nn.init.uniform_(self.module_logits, -1e-3, 1e-3)

    def _logits(self, task_ids: torch.Tensor) -> torch.Tensor:
        logits = self.module_logits[task_ids.to(self.module_logits.device)]
        return logits.view(-1, self.n_splits, self.n_skills)

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Routing weights for ``task_ids`` (LongTensor ``(n,)``) -> ``(n, n_splits, n_skills)``."""
        if not self.training:
            return self.eval_weights(task_ids)
        probs = RelaxedBernoulli(temperature=1.0, logits=self._logits(task_ids)).rsample()
        return probs / (probs.sum(dim=-1, keepdim=True) + EPS)

    def eval_weights(self, task_ids: torch.Tensor) -> torch.Tensor:
        """The deterministic (eval) routing weights, whatever the mode: ``(n, n_splits, n_skills)``."""
        probs = torch.sigmoid(self._logits(task_ids))
        return probs / (probs.sum(dim=-1, keepdim=True) + EPS)

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}, n_skills={self.n_skills}, n_splits={self.n_splits}"
