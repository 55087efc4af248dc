"""Sorting assignments by expert (``sparselm.ops.permute``): row order, capacity priority, drop counts, the inverse
permutation and per-choice values in row order, on hand-written routings."""

from __future__ import annotations

import torch

from sparselm.ops import permute


def test_dropless_rows_are_sorted_by_expert_first_choices_then_earlier_tokens() -> None:
    # 4 tokens, top-2 over 3 experts. Assignment a = choice * T + token.
    experts = torch.tensor([[1, 0], [0, 2], [1, 2], [0, 1]])
    counts = torch.bincount(experts.flatten(), minlength=3)
    perm = permute(experts, counts)
    # Expert 0: token 1 (1st choice), token 3 (1st), token 0 (2nd); expert 1: tokens 0, 2 (1st), token 3 (2nd);
    # expert 2: tokens 1, 2 (2nd).
    assert perm.order.tolist() == [1, 3, 4, 0, 2, 7, 5, 6]
    assert perm.token_of_row.tolist() == [1, 3, 0, 0, 2, 3, 1, 2]
    assert perm.counts.tolist() == [3, 3, 2] and int(perm.dropped) == 0
    assert perm.inverse is not None and torch.equal(perm.order[perm.inverse], torch.arange(8))
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1]])
    assert torch.equal(perm.rows_of(weights), torch.tensor([0.7, 0.9, 0.4, 0.6, 0.8, 0.1, 0.3, 0.2]))
    assert (perm.top_k, perm.num_tokens) == (2, 4)


def test_capacity_keeps_first_choices_then_earlier_tokens() -> None:
    # Every token ranks expert 0 first and expert 1 second, except token 3 (expert 1 first). Capacity 2.
    experts = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    counts = torch.bincount(experts.flatten(), minlength=3)
    perm = permute(experts, counts, capacity=2)
    # Expert 0: first choices of tokens 0, 1 (token 2's first choice and token 3's second are dropped).
    # Expert 1: token 3's first choice beats the earlier tokens' second choices; then token 0's second choice.
    assert perm.order.tolist() == [0, 1, 3, 4]
    assert perm.token_of_row.tolist() == [0, 1, 3, 0]
    assert perm.counts.tolist() == [2, 2, 0] and int(perm.dropped) == 4
    assert perm.inverse is None  # some assignments have no row
    # A capacity nobody reaches drops nothing and keeps the dropless layout.
    roomy = permute(experts, counts, capacity=4)
    assert int(roomy.dropped) == 0 and roomy.inverse is not None
    assert torch.equal(roomy.order, permute(experts, counts).order)


def test_no_tokens() -> None:
    perm = permute(torch.zeros(0, 2, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))
    assert perm.order.numel() == 0 and perm.counts.tolist() == [0, 0, 0, 0] and perm.inverse is not None
