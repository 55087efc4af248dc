"""Sort a routing's (token, choice) assignments by expert, dropping what exceeds an expert's capacity.

Assignment ``a = choice * T + token`` ("choice-major"), so a stable sort by expert keeps first choices ahead of second
choices and earlier tokens ahead of later ones within each expert: under a capacity, first choices win over second
choices, then earlier tokens over later ones (GShard's priority).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Permutation:
    """Where every row of the expert-sorted layout comes from. M rows, T tokens, k choices per token."""

    order: torch.Tensor  # [M] the assignment of each row, rows sorted by expert
    token_of_row: torch.Tensor  # [M] the token of each row
    inverse: torch.Tensor | None  # [T*k] the row of each assignment, when none was dropped (else None)
    counts: torch.Tensor  # [E] rows per expert (after dropping)
    dropped: torch.Tensor  # scalar int64, assignments dropped for lack of capacity
    top_k: int
    num_tokens: int

    def rows_of(self, per_choice: torch.Tensor) -> torch.Tensor:
        """A [T, k] value per (token, choice), e.g. the gate weights -> [M] in row order."""
        return per_choice.t().flatten()[self.order]


def permute(experts: torch.Tensor, counts: torch.Tensor, capacity: int | None = None) -> Permutation:
    """``experts`` [T, k] chosen expert ids, ``counts`` [E] assignments per expert; ``capacity`` rows per expert at
    most (None: dropless)."""
    num_tokens, top_k = experts.shape
    experts_flat = experts.t().flatten()
    order = torch.argsort(experts_flat, stable=True)
    dropped = torch.zeros((), dtype=torch.int64, device=experts.device)
    if capacity is not None:
        starts = torch.cumsum(counts, 0) - counts
        rank_in_expert = torch.arange(order.numel(), device=experts.device) - starts[experts_flat[order]]
        order = order[rank_in_expert < capacity]
        kept = counts.clamp(max=capacity)
        dropped = counts.sum() - kept.sum()
        counts = kept
    inverse = None
    if order.numel() == experts_flat.numel():
        # Nothing dropped: row -> assignment is a permutation, and its inverse turns scatters into gathers.
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=experts.device)
    return Permutation(order, order % num_tokens, inverse, counts, dropped, top_k, num_tokens)
