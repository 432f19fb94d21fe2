import itertools

import numpy as np
import pytest
import torch

from mpdeploy.core.errors import MpdeployError
from mpdeploy.sparsity.patterns import (
    NM,
    from_reduction_view,
    is_24_compliant_2d,
    is_nm_compliant,
    nm_mask,
    nm_violations,
    parse_pattern,
    reduction_view,
)
from mpdeploy.sparsity.saliency import block_cost_mask_2d, compute_mask, keep_patterns
from mpdeploy.sparsity.stats import InputStats


@pytest.mark.parametrize("text,expected", [("2:4", NM(2, 4)), (" 8 : 16 ", NM(8, 16)), ("1:2", NM(1, 2)), ("6:12", NM(6, 12))])
def test_parse_valid(text, expected):
    assert parse_pattern(text) == expected
    assert str(parse_pattern(text)) == f"{expected.n}:{expected.m}"


@pytest.mark.parametrize("text", ["4:2", "0:4", "2:0", "a:b", "2:4:8", "", "2/4", "4:4", "-1:4"])
def test_parse_rejects(text):
    with pytest.raises(MpdeployError) as err:
        parse_pattern(text)
    assert "2:4" in str(err.value)  # the message shows a valid example


def test_runs_sparse_only_for_24_compatible():
    assert NM(2, 4).runs_sparse and NM(1, 4).runs_sparse and NM(2, 8).runs_sparse and NM(1, 2).runs_sparse
    assert not NM(8, 16).runs_sparse and not NM(6, 12).runs_sparse and not NM(3, 4).runs_sparse


def _brute_force_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    rows, k = scores.shape
    mask = np.zeros_like(scores, dtype=bool)
    for r in range(rows):
        for g in range(k // m):
            group = scores[r, g * m : (g + 1) * m]
            # stable: among ties the lower index wins
            keep = sorted(range(m), key=lambda i: (-group[i], i))[:n]
            mask[r, [g * m + i for i in keep]] = True
    return mask


@pytest.mark.parametrize("pattern", [NM(2, 4), NM(1, 4), NM(4, 8), NM(8, 16)])
def test_linear_mask_keeps_top_n_per_group(pattern):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))
    mask = nm_mask(w.abs(), pattern)
    assert mask.shape == w.shape
    np.testing.assert_array_equal(mask.numpy(), _brute_force_mask(w.abs().numpy(), pattern.n, pattern.m))
    assert is_nm_compliant(w * mask, pattern)
    assert int(mask.sum()) == w.numel() * pattern.n // pattern.m


def test_conv_mask_groups_along_input_channels_at_each_position():
    w = torch.randn(8, 16, 3, 3, generator=torch.Generator().manual_seed(2))
    mask = nm_mask(w.abs(), NM(2, 4))
    pruned = w * mask
    # At every (out, kh, kw) each run of 4 input channels holds exactly 2 nonzeros.
    nz = (pruned != 0).reshape(8, 4, 4, 3, 3).sum(2)
    assert bool((nz == 2).all())
    # ...which is NOT the same as grouping the flattened C_in*kh*kw axis.
    flat = (pruned != 0).reshape(8, -1)
    assert not bool((flat.reshape(8, -1, 4).sum(-1) <= 2).all())


def test_reduction_view_round_trip():
    w = torch.randn(6, 8, 3, 5)
    assert torch.equal(from_reduction_view(reduction_view(w), w.shape), w)
    assert reduction_view(w).shape == (6 * 3 * 5, 8)


def test_violations_count_exactly():
    w = torch.ones(2, 8)
    w[0, :2] = 0
    w[0, 4:6] = 0  # row 0 is exactly 2:4
    assert nm_violations(w, NM(2, 4)) == 2  # row 1 has two full groups
    assert not is_nm_compliant(w, NM(2, 4))
    w[1] = torch.tensor([1, 0, 0, 1, 0, 1, 1, 0.0])
    assert is_nm_compliant(w, NM(2, 4))


def test_trt_rule_on_raw_arrays():
    a = np.array([[1, 0, 0, 1], [0, 1, 1, 0]], dtype=np.float32)
    assert is_24_compliant_2d(a, axis=1)
    assert not is_24_compliant_2d(np.ones((4, 4)), axis=1)
    assert not is_24_compliant_2d(np.ones((4, 6)), axis=1)  # not a multiple of 4


def test_block_cost_with_identity_covariance_equals_magnitude():
    # With C_g = I the removed energy is the sum of squared removed weights: magnitude is optimal.
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    cov = torch.eye(4).expand(8, 4, 4).clone()
    mask = block_cost_mask_2d(w, cov, NM(2, 4))
    np.testing.assert_array_equal(mask.numpy(), _brute_force_mask(w.abs().numpy(), 2, 4))


@pytest.mark.parametrize("pattern", [NM(2, 4), NM(3, 6)])
def test_block_cost_is_the_exhaustive_minimum(pattern):
    gen = torch.Generator().manual_seed(4)
    rows, k = 5, 3 * pattern.m
    w = torch.randn(rows, k, generator=gen)
    x = torch.randn(200, k, generator=gen) @ torch.randn(k, k, generator=gen)  # correlated inputs
    stats = InputStats()
    stats.update(x, (pattern.m,))
    cov = stats.group_cov[pattern.m]
    mask = block_cost_mask_2d(w, cov, pattern)
    for r in range(rows):
        for g in range(k // pattern.m):
            u = w[r, g * pattern.m : (g + 1) * pattern.m].double()
            c = cov[g]
            costs = {}
            for keep in itertools.combinations(range(pattern.m), pattern.n):
                removed = u.clone()
                removed[list(keep)] = 0
                costs[keep] = float(removed @ c @ removed)
            best = min(costs.values())
            chosen = tuple(int(i) for i in torch.nonzero(mask[r, g * pattern.m : (g + 1) * pattern.m]).flatten())
            assert costs[chosen] == pytest.approx(best, rel=1e-9, abs=1e-9)


def test_block_cost_8_16_chunks_a_large_layer():
    # 12,870 keep-patterns on a 512x256 layer: must run chunked, and stay exactly 8:16.
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(512, 256, generator=gen)
    stats = InputStats()
    stats.update(torch.randn(64, 256, generator=gen), (16,))
    mask = compute_mask(w, NM(8, 16), "block-cost", stats)
    assert is_nm_compliant(w * mask, NM(8, 16)) and int(mask.sum()) == w.numel() // 2
    assert keep_patterns(NM(8, 16)).shape == (12870, 16)


def test_wanda_uses_input_norms():
    w = torch.ones(1, 4)
    stats = InputStats()
    stats.update(torch.tensor([[0.1, 3.0, 0.2, 2.0]]))
    mask = compute_mask(w, NM(2, 4), "wanda", stats)
    assert mask.tolist() == [[False, True, False, True]]
    with pytest.raises(MpdeployError):
        compute_mask(w, NM(2, 4), "wanda", None)
