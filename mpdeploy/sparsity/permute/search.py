"""The permutation search: input-channel orders that raise the saliency an N:M mask keeps."""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass

import torch

from mpdeploy.core.errors import MpdeployError
from mpdeploy.sparsity.patterns import NM
from mpdeploy.sparsity.threads import single_thread

logger = logging.getLogger(__name__)

# Below this many [rows x K x K] elements a round evaluates every column pair at once.
ALL_PAIRS_ELEMENTS = 1 << 23
# Working-set cap (elements) of one batched evaluation; bounds memory on big layers.
CHUNK_ELEMENTS = 1 << 22
# Stripe-group moves enumerate C(2M-1, M-1) splits of two groups: 35 for M=4, 3432 for M=8.
MAX_STRIPE_SPLITS = 64
STRIPE_ELEMENTS = 1 << 21  # working elements of one stripe round on a small matrix
# Below this many rows*K*M elements the search runs on one intra-op thread.
SINGLE_THREAD_ELEMENTS = 1 << 24
# Without a time budget the search does a fixed amount of work, so its result is deterministic:
DEFAULT_WORK = 1.6e8  # large matrices: matching rounds of rows*K*M element-ops each (17 for 768x3072 2:4)
DEFAULT_ESCAPES = 10  # small (all-pairs) matrices: perturbation restarts
UNSTRUCTURED_KIND = "per-matrix top-k at the same density"


# ----------------------------------------------------------------------------------------------
# kept saliency
# ----------------------------------------------------------------------------------------------


def kept_saliency(saliency: torch.Tensor, pattern: NM, perm: torch.Tensor | None = None) -> float:
    """Sum of the saliency an N:M mask keeps, after reordering the columns by `perm` (new j = old perm[j])."""
    s = saliency if perm is None else saliency[:, perm]
    rows, k = s.shape
    if k % pattern.m:
        raise MpdeployError(f"reduction dimension {k} is not a multiple of M={pattern.m} for pattern {pattern}")
    groups = s.T.reshape(k // pattern.m, pattern.m, rows)  # one contiguous row per column
    return float(_top_n_sum(groups, pattern.n, 1).double().sum())


def unstructured_kept(saliency: torch.Tensor, density: float) -> float:
    """Saliency kept by unstructured pruning at the same density: the global top-k of the matrix.

    This bounds what any permutation can reach (it is also above the per-row top-k bound).
    """
    flat = saliency.reshape(-1).double()
    k = int(round(density * flat.numel()))
    return float(flat.topk(k).values.sum()) if k else 0.0


# ----------------------------------------------------------------------------------------------
# per-group terms via a sorting network (much faster than torch.sort on a tiny last dimension)
# ----------------------------------------------------------------------------------------------


def _batcher_network(m: int) -> list[tuple[int, int]]:
    """Comparators of Batcher's odd-even merge sort for m inputs (padded to a power of two;
    comparators touching padding are dropped, valid because padding sorts to the end)."""
    size = 1 << max(0, (m - 1).bit_length())
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    a, b = i + j, i + j + k
                    if (a // (2 * p)) == (b // (2 * p)) and b < m:
                        pairs.append((a, b))
            k //= 2
        p *= 2
    return pairs


def _sorted_desc(vals: list[torch.Tensor]) -> list[torch.Tensor]:
    """Elementwise descending sort of M same-shape tensors (a sorting network: on a tiny sort
    dimension this is far faster than torch.sort / topk)."""
    vals = list(vals)
    for a, b in _batcher_network(len(vals)):
        hi = torch.maximum(vals[a], vals[b])
        vals[b] = torch.minimum(vals[a], vals[b])
        vals[a] = hi
    return vals


def _top_n_sum(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """Sum of the n largest entries along a short dimension `dim`."""
    s = _sorted_desc(list(x.unbind(dim)))
    return torch.stack(s[:n]).sum(0)


@dataclass(frozen=True)
class _GroupTerms:
    q: torch.Tensor  # [G, M, R]: N-th largest of the group once that column is removed
    loss: torch.Tensor  # [G, M]: kept saliency the group loses (summed over rows) when that column leaves


def _group_terms(xt3: torch.Tensor, n: int) -> _GroupTerms:
    """Swap terms of every column; xt3 is the transposed matrix grouped, [G, M, R]."""
    s = _sorted_desc(list(xt3.unbind(1)))
    s_n1, s_n = s[n - 1].unsqueeze(1), s[n].unsqueeze(1)  # N-th and (N+1)-th largest, [G, 1, R]
    # Column in the top N (x >= N-th largest; exact even with ties, since a tied column gives the
    # same q and loss on either side of the tie): q = (N+1)-th, loss = x; otherwise q = loss = N-th.
    # Arithmetic instead of a broadcasting torch.where, which is several times slower on CPU.
    in_top = (xt3 >= s_n1).to(xt3.dtype)
    q = s_n1 - in_top * (s_n1 - s_n)
    loss = torch.maximum(xt3, s_n1).sum(-1)
    return _GroupTerms(q, loss)


# ----------------------------------------------------------------------------------------------
# the search
# ----------------------------------------------------------------------------------------------


class _Search:
    """Mutable search state: the permuted matrix, stored transposed (xt = saliency[:, perm].T, one
    contiguous row per column, so gathers and the row sums of every move are contiguous), and perm."""

    def __init__(self, saliency: torch.Tensor, pattern: NM, seed: int, deadline: float | None):
        self.n, self.m = pattern.n, pattern.m
        self.rows, self.k = saliency.shape
        self.g = self.k // self.m
        self.st = saliency.T.contiguous()  # [K, R]
        self.gen = torch.Generator().manual_seed(seed)
        self.deadline = deadline
        self.perm = torch.arange(self.k)
        self.xt = self.st.clone()
        # Improvements below this are rounding noise (float32 sums): never accept them.
        self.tol = 1e-6 * float(saliency.sum()) / max(1, self.g)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def grouped(self) -> torch.Tensor:
        return self.xt.view(self.g, self.m, self.rows)

    def set_perm(self, perm: torch.Tensor) -> None:
        self.perm = perm.clone()
        self.xt = self.st[perm]

    def reorder(self, idx: torch.Tensor) -> None:
        self.xt = self.xt[idx]
        self.perm = self.perm[idx]

    def kept(self) -> float:
        return float(_top_n_sum(self.grouped(), self.n, 1).double().sum())

    def apply_swaps(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Swap column pairs (a_i, b_i); all indices distinct."""
        if a.numel() == 0:
            return
        idx = torch.arange(self.k)
        idx[a], idx[b] = b, a
        self.reorder(idx)

    # -- initialization --------------------------------------------------------------------
    def stripe_init(self) -> torch.Tensor:
        """Columns sorted by total saliency, dealt round-robin: group g gets ranks g, g+G, g+2G..."""
        order = torch.argsort(self.st.sum(1), descending=True, stable=True)
        return order.reshape(self.m, self.g).T.reshape(-1)

    # -- all column pairs (small matrices) ---------------------------------------------------
    def all_pairs_round(self) -> bool:
        t = _group_terms(self.grouped(), self.n)
        q = t.q.reshape(self.k, self.rows)
        gain = torch.empty(self.k, self.k)  # gain[a, b]: group(a) when column a is replaced by column b
        chunk = max(1, CHUNK_ELEMENTS // (self.rows * self.k))
        for start in range(0, self.k, chunk):
            qa = q[start : start + chunk]
            gain[start : start + chunk] = torch.maximum(self.xt.unsqueeze(0), qa.unsqueeze(1)).sum(-1)
        gain -= t.loss.reshape(self.k, 1)
        delta = gain + gain.T
        d4 = delta.view(self.g, self.m, self.g, self.m)
        same = torch.arange(self.g)
        d4[same, :, same, :] = float("-inf")
        gi, hi = self.all_group_pairs()
        flat = d4.permute(0, 2, 1, 3).reshape(self.g, self.g, self.m * self.m)[gi, hi]
        best, where = flat.max(dim=1)  # best swap per pair of groups
        picked = self._pick_disjoint(gi, hi, best)
        if picked.numel() == 0:
            return False
        self.apply_swaps(gi[picked] * self.m + where[picked] // self.m, hi[picked] * self.m + where[picked] % self.m)
        return True

    def _pick_disjoint(self, g_idx: torch.Tensor, h_idx: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
        """Positions of a greedy, best-first set of improving moves whose groups are pairwise
        disjoint (moves on disjoint groups are independent, so all of them can be applied at once)."""
        cand = torch.nonzero(gains > self.tol).squeeze(1)
        if cand.numel() == 0:
            return cand
        cand = cand[torch.argsort(gains[cand], descending=True, stable=True)]
        used = torch.zeros(self.g, dtype=torch.bool)
        picked = []
        for c, gi, hi in zip(cand.tolist(), g_idx[cand].tolist(), h_idx[cand].tolist(), strict=True):
            if not (used[gi] or used[hi]):
                used[gi] = used[hi] = True
                picked.append(c)
        return torch.tensor(picked, dtype=torch.long)

    # -- group pairs from a matching (large matrices) ----------------------------------------
    def matching_round(self, g_idx: torch.Tensor, h_idx: torch.Tensor) -> bool:
        """Best swap within each pair (g_idx[p], h_idx[p]) of disjoint groups; apply the improving ones."""
        x3 = self.grouped()
        t = _group_terms(x3, self.n)
        pairs = g_idx.numel()
        best_delta = torch.empty(pairs)
        best_flat = torch.empty(pairs, dtype=torch.long)
        chunk = max(1, CHUNK_ELEMENTS // (self.rows * self.m * self.m))
        for start in range(0, pairs, chunk):
            gi, hi = g_idx[start : start + chunk], h_idx[start : start + chunk]
            # gain_g[p, i, j]: group g when its column i is replaced by h's column j; and vice versa.
            gain_g = torch.maximum(x3[hi].unsqueeze(1), t.q[gi].unsqueeze(2)).sum(-1) - t.loss[gi].unsqueeze(2)
            gain_h = torch.maximum(x3[gi].unsqueeze(1), t.q[hi].unsqueeze(2)).sum(-1) - t.loss[hi].unsqueeze(2)
            delta = (gain_g + gain_h.transpose(1, 2)).reshape(gi.numel(), -1)
            best_delta[start : start + chunk], best_flat[start : start + chunk] = delta.max(dim=1)
        good = self._pick_disjoint(g_idx, h_idx, best_delta)
        if good.numel() == 0:
            return False
        a = g_idx[good] * self.m + best_flat[good] // self.m
        b = h_idx[good] * self.m + best_flat[good] % self.m
        self.apply_swaps(a, b)
        return True

    def schedule(self):
        """Round-robin tournament over groups (circle method), relabelled at random each sweep:
        every pair of groups meets once per sweep of G-1 (or G) rounds."""
        g = self.g + (self.g % 2)  # a dummy group when G is odd
        while True:
            labels = torch.randperm(g, generator=self.gen)
            ring = list(range(1, g))
            for _ in range(g - 1):
                order = [0, *ring]
                left, right = order[: g // 2], order[g // 2 :][::-1]
                gi, hi = labels[torch.tensor(left)], labels[torch.tensor(right)]
                keep = (gi < self.g) & (hi < self.g)
                yield gi[keep], hi[keep]
                ring = ring[-1:] + ring[:-1]

    # -- stripe groups: exhaustive re-partition of two groups --------------------------------
    def stripe_round(self, g_idx: torch.Tensor, h_idx: torch.Tensor) -> bool:
        m, n = self.m, self.n
        # Splits of the 2M columns into two halves; column 0 stays in the first half (symmetry),
        # and split 0 is the current partition.
        subsets = [c for c in itertools.combinations(range(2 * m), m) if c[0] == 0]
        first = torch.tensor(subsets)
        second = torch.tensor([[i for i in range(2 * m) if i not in c] for c in subsets])
        splits = first.shape[0]
        # Every half of every split, as one flat index into the 2M columns (index_select is much
        # faster than advanced indexing here).
        halves = torch.cat([first, second]).reshape(-1)
        x3 = self.grouped()
        pairs = g_idx.numel()
        best_val = torch.empty(pairs)
        best_idx = torch.empty(pairs, dtype=torch.long)
        chunk = max(1, CHUNK_ELEMENTS // (self.rows * splits * 2 * m))
        for start in range(0, pairs, chunk):
            gi, hi = g_idx[start : start + chunk], h_idx[start : start + chunk]
            both = torch.cat([x3[gi], x3[hi]], dim=1).transpose(0, 1).contiguous()  # [2M, P, R]
            # [2*splits, M, P, R]: the sorting network then works on long contiguous slices.
            gathered = both.index_select(0, halves).view(2 * splits, m, gi.numel(), self.rows)
            kept = _top_n_sum(gathered, n, 1).sum(-1).T  # [P, 2*splits]
            total = kept[:, :splits] + kept[:, splits:]
            val, idx = total.max(dim=1)
            best_val[start : start + chunk] = val - total[:, 0]
            best_idx[start : start + chunk] = idx
        good = self._pick_disjoint(g_idx, h_idx, best_val)
        if good.numel() == 0:
            return False
        offsets = torch.arange(m)
        cols = torch.cat([g_idx[good, None] * m + offsets, h_idx[good, None] * m + offsets], dim=1)  # [P', 2M]
        chosen = torch.cat([first[best_idx[good]], second[best_idx[good]]], dim=1)
        idx = torch.arange(self.k)
        idx[cols.reshape(-1)] = torch.gather(cols, 1, chosen).reshape(-1)
        self.reorder(idx)
        return True

    def all_group_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        iu = torch.triu_indices(self.g, self.g, 1)
        return iu[0], iu[1]

    def stripe_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Group pairs for one stripe round: all of them when affordable, else a random sample
        whose cost fits STRIPE_ELEMENTS (stripe moves cost splits*2M*rows per pair)."""
        gi, hi = self.all_group_pairs()
        per_pair = math.comb(2 * self.m - 1, self.m - 1) * 2 * self.m * self.rows
        budget = max(1, STRIPE_ELEMENTS // per_pair)
        if gi.numel() > budget:
            pick = torch.randperm(gi.numel(), generator=self.gen)[:budget]
            gi, hi = gi[pick], hi[pick]
        return gi, hi

    def perturb(self, swaps: int) -> None:
        """Random swaps between different groups (escape from a local optimum)."""
        cols = torch.randperm(self.k, generator=self.gen)
        a, b = cols[:swaps], cols[swaps : 2 * swaps]
        keep = (a // self.m) != (b // self.m)
        self.apply_swaps(a[keep], b[keep])


def search_permutation(
    saliency: torch.Tensor, pattern: NM, seconds: float | None = None, seed: int = 0
) -> tuple[torch.Tensor, float, float]:
    """Column permutation of `saliency` [rows, K] raising the saliency the N:M mask keeps.

    Returns (perm, kept_before, kept_after): the permuted matrix is saliency[:, perm]; kept values are
    sums of kept saliency. `seconds` bounds the search time (None: a fixed amount of work, so the
    result is deterministic for a given seed). kept_after >= kept_before always.
    """
    if saliency.dim() != 2:
        raise MpdeployError(f"search_permutation expects a 2-D saliency matrix, got shape {tuple(saliency.shape)}")
    rows, k = saliency.shape
    if k % pattern.m:
        raise MpdeployError(f"reduction dimension {k} is not a multiple of M={pattern.m} for pattern {pattern}")
    s = saliency.detach().float().cpu().abs()
    before = kept_saliency(s, pattern)
    identity = torch.arange(k)
    if k // pattern.m < 2 or not bool(torch.isfinite(s).all()) or float(s.sum()) == 0:
        return identity, before, before
    with single_thread(rows * k * pattern.m < SINGLE_THREAD_ELEMENTS):
        return _search(s, pattern, seconds, seed, before)




def _search(s: torch.Tensor, pattern: NM, seconds: float | None, seed: int, before: float):
    rows, k = s.shape
    identity = torch.arange(k)
    deadline = None if seconds is None else time.perf_counter() + max(0.0, seconds)
    st = _Search(s, pattern, seed, deadline)

    stripe = st.stripe_init()
    if kept_saliency(s, pattern, stripe) > before:
        st.set_perm(stripe)

    use_stripe = math.comb(2 * pattern.m - 1, pattern.m - 1) <= MAX_STRIPE_SPLITS
    if rows * k * k <= ALL_PAIRS_ELEMENTS:
        _search_small(st, use_stripe)
    else:
        _search_large(st, use_stripe)

    after = kept_saliency(s, pattern, st.perm)
    if after <= before:  # never return something worse than the input order
        return identity, before, before
    return st.perm.clone(), before, after


def _local_opt_small(st: _Search, use_stripe: bool) -> None:
    while not st.out_of_time():
        if st.all_pairs_round():
            continue
        if use_stripe and st.stripe_round(*st.stripe_pairs()):
            continue
        break


def _search_small(st: _Search, use_stripe: bool) -> None:
    _local_opt_small(st, use_stripe)
    best_perm, best = st.perm.clone(), st.kept()
    escapes = 0
    # Escape local optima: perturb a few columns, re-optimize, keep the best order seen. A time
    # budget bounds the loop by time; without one it is a fixed number of restarts.
    while not st.out_of_time() and (st.deadline is not None or escapes < DEFAULT_ESCAPES):
        escapes += 1
        st.perturb(max(2, st.k // 32))
        _local_opt_small(st, use_stripe)
        kept = st.kept()
        if kept > best:
            best, best_perm = kept, st.perm.clone()
        else:
            st.set_perm(best_perm)
    st.set_perm(best_perm)


def _search_large(st: _Search, use_stripe: bool) -> None:
    """Matching rounds of pairwise swaps until converged (a whole sweep without an improving swap),
    then, for small M, rounds that add stripe-group moves (about 5x the cost) until those converge
    too. Stops early when out of time or, without a time budget, out of the fixed work allowance."""
    unit = st.rows * st.k * st.m
    work_left = None if st.deadline is not None else DEFAULT_WORK
    sweep = st.g + (st.g % 2) - 1
    stripe_phase = False
    idle = 0
    for g_idx, h_idx in st.schedule():
        if st.out_of_time() or (work_left is not None and work_left <= 0):
            break
        improved = st.matching_round(g_idx, h_idx)
        if stripe_phase:
            improved = st.stripe_round(g_idx, h_idx) or improved
        if work_left is not None:
            work_left -= unit * (6 if stripe_phase else 1)
        idle = 0 if improved else idle + 1
        if idle >= sweep:
            if stripe_phase or not use_stripe:
                break
            stripe_phase, idle = True, 0
