"""Input-channel permutations that raise the saliency an N:M mask keeps, folded into the producers.

Two halves:

* `search_permutation`: for a saliency matrix [rows, K], a column order whose N:M mask keeps more
  saliency (Pool & Yu, NeurIPS 2021). Initialization: the better of the identity and a "stripe"
  deal (columns sorted by total saliency, dealt round-robin so each group gets one column of each
  tier). Then local search with exact, batched move evaluation:
  - pairwise column swaps between two groups. Replacing column a of group g by a column x changes
    the group's kept saliency per row to P_a + max(x, Q_a) (P_a: top N-1 of the group without a,
    Q_a: its N-th largest), so every swap's gain is a sum of maxima, computed for many candidates at
    once with tensor ops. Small matrices evaluate all column pairs; large ones pair up groups
    (round-robin tournament schedule, relabelled at random each sweep) and evaluate the M*M swaps of
    every pair. Swaps on disjoint groups are independent, so a whole batch is applied per round.
  - stripe-group moves (M <= 4): exhaustively re-partition the 2M columns of two groups (35 splits
    for 2:4); on small matrices interleaved with the swaps, on large ones once the swaps converge.
  - random perturbations to escape local optima, keeping the best order seen (small matrices).
  Without a time budget the work is fixed (deterministic result); about 0.5-0.6 s of one core for a
  768x3072 2:4 matrix (benchmarks/results/permutation.md).
* `permute_model`: find the layers whose input channels can be permuted for free (the permutation
  is folded into whatever produces those channels, so the model's function is unchanged and the
  new order survives save/load), search each consumer's permutation on its own saliency, fold it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from mpdeploy.errors import MpdeployError
from mpdeploy.layers import LayerInfo
from mpdeploy.patterns import NM

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
    with _single_thread(rows * k * pattern.m < SINGLE_THREAD_ELEMENTS):
        return _search(s, pattern, seconds, seed, before)


@contextlib.contextmanager
def _single_thread(active: bool):
    """The search is many small tensor ops: on few, shared cores intra-op threads cost more than
    they bring (3-5x slower measured with 2 threads on 2 busy cores)."""
    previous = torch.get_num_threads()
    if active and previous > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


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


# ----------------------------------------------------------------------------------------------
# folding: which layers' input channels can be permuted for free, and how
# ----------------------------------------------------------------------------------------------

LN_STREAM_REASON = "fed by LayerNorm of the residual stream: needs a whole-stream permutation (not done)"
DW_STREAM_REASON = (
    "fed by the residual stream through a depthwise conv and LayerNorm: needs a whole-stream permutation (not done)"
)
RESIDUAL_REASON = (
    "input is the residual stream (block input, shared with the shortcut add): needs one shared permutation "
    "across the whole residual group (not done)"
)
NO_FOLD_REASON = (
    "no producer to fold a permutation into (not a recognized block structure); a runtime gather would cost "
    "time at inference (not done)"
)


@dataclass(frozen=True)
class ChannelEdit:
    """A tensor whose channels along `dim` follow the consumer's input channels. The K channels
    sit at `offsets` along `dim` (one offset usually; two for gated MLPs, the v slice for qkv)."""

    module: str
    attr: str  # parameter or buffer name
    dim: int
    offsets: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class Fold:
    """How to permute the input channels of `consumer` without changing the model's function."""

    consumer: str
    group: str  # name of the coupled group, for the report
    producers: tuple[ChannelEdit, ...]
    block: int | None = None  # permutations only within consecutive blocks of this size (attention heads)


def _is_param_free(module: nn.Module) -> bool:
    return next(module.parameters(recurse=True), None) is None


def _per_channel_edits(path: str, module: nn.Module, channels: int) -> tuple[ChannelEdit, ...] | None:
    """Edits for an elementwise / per-channel module sitting between producer and consumer, or
    None if we cannot prove it commutes with a channel permutation."""
    if isinstance(module, (nn.Identity, nn.Dropout)) or type(module).__name__ in ("DropBlock2d", "DropPath"):
        return ()
    if isinstance(module, (nn.modules.batchnorm._BatchNorm)):
        if module.num_features != channels:
            return None
        names = [a for a in ("weight", "bias", "running_mean", "running_var") if getattr(module, a, None) is not None]
        act = getattr(module, "act", None)  # timm BatchNormAct2d: BN + activation (+ drop) in one
        if act is not None and not _is_param_free(act):
            return None
        return tuple(ChannelEdit(path, a, 0) for a in names)
    if isinstance(module, nn.LayerNorm):  # also timm LayerNorm / LayerNorm2d: statistics are permutation-invariant
        if tuple(module.normalized_shape) != (channels,):
            return None
        return tuple(ChannelEdit(path, a, 0) for a in ("weight", "bias") if getattr(module, a, None) is not None)
    if type(module).__name__ == "GlobalResponseNorm":
        # GRN: per-channel spatial L2 norm divided by its mean over channels (permutation-invariant),
        # then per-channel weight/bias: the weight and bias move with the channels.
        if module.weight.shape != (channels,):
            return None
        return (ChannelEdit(path, "weight", 0), ChannelEdit(path, "bias", 0))
    if type(module).__name__ == "BlurPool2d":
        filt = getattr(module, "filt", None)
        if filt is not None and filt.shape[0] == channels:
            return (ChannelEdit(path, "filt", 0),)
        return ()
    if isinstance(module, (nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d)):
        return ()
    # Activations: elementwise and parameter-free (a per-channel PReLU would have to move too).
    origin = type(module).__module__
    if _is_param_free(module) and origin.startswith(("torch.nn.modules.activation", "timm.layers.activations")):
        return ()
    return None


def _layer_edits(path: str, layer: nn.Module) -> tuple[ChannelEdit, ...]:
    """The producer's own output channels: weight rows (+ bias)."""
    edits = [ChannelEdit(path, "weight", 0)]
    if getattr(layer, "bias", None) is not None:
        edits.append(ChannelEdit(path, "bias", 0))
    return tuple(edits)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _mlp_fold(path: str, mlp: nn.Module) -> tuple[Fold | None, str | None]:
    """timm Mlp / GlobalResponseNormMlp / GluMlp / SwiGLU: fc1 rows (+bias, + norm/GRN) <-> fc2 columns."""
    fc2 = mlp.fc2
    kinds = (nn.Linear,) if isinstance(fc2, nn.Linear) else (nn.Conv2d,)
    if isinstance(fc2, nn.Conv2d) and (fc2.kernel_size != (1, 1) or fc2.groups != 1):
        return None, "fc2 is not a plain 1x1 conv"
    hidden = fc2.weight.shape[1]
    name = type(mlp).__name__
    edits: list[ChannelEdit] = []
    between = []
    if name == "SwiGLU":
        for fc in ("fc1_g", "fc1_x"):
            layer = getattr(mlp, fc)
            if not isinstance(layer, kinds) or layer.weight.shape[0] != hidden:
                return None, f"{fc} does not produce fc2's {hidden} input channels"
            edits += _layer_edits(_join(path, fc), layer)
        between = ["act", "drop", "norm"]
    else:
        fc1 = mlp.fc1
        if not isinstance(fc1, kinds) or (isinstance(fc1, nn.Conv2d) and fc1.groups != 1):
            return None, "fc1 and fc2 are not the same kind of plain layer"
        if name == "GluMlp":
            if fc1.weight.shape[0] != 2 * hidden:
                return None, "gated fc1 does not produce 2x fc2's input channels"
            # x1, x2 = fc1(x).chunk(2): both halves must move together.
            edits.append(ChannelEdit(_join(path, "fc1"), "weight", 0, (0, hidden)))
            if fc1.bias is not None:
                edits.append(ChannelEdit(_join(path, "fc1"), "bias", 0, (0, hidden)))
        else:
            if fc1.weight.shape[0] != hidden:
                return None, "fc1 does not produce fc2's input channels"
            edits += _layer_edits(_join(path, "fc1"), fc1)
        between = ["act", "drop1", "norm", "grn"]
    for attr in between:
        sub = getattr(mlp, attr, None)
        if sub is None:
            continue
        sub_edits = _per_channel_edits(_join(path, attr), sub, hidden)
        if sub_edits is None:
            return None, f"{attr} ({type(sub).__name__}) between fc1 and fc2 may not commute with a channel permutation"
        edits += sub_edits
    return Fold(_join(path, "fc2"), f"{path} (fc1 -> fc2)", tuple(edits)), None


def _attention_fold(path: str, attn: nn.Module) -> tuple[Fold | None, str | None]:
    """timm Attention: v rows of qkv (per head) <-> proj columns. q/k rows stay: each head's output
    is attn_h @ v_h, so permuting v_h's channels permutes that head's output channels, nothing else.
    Whole-head moves never change which weights share an N:M group (M divides head_dim), so the
    search runs within each head."""
    qkv, proj = attn.qkv, attn.proj
    heads, head_dim = int(attn.num_heads), int(attn.head_dim)
    dim = heads * head_dim
    linear = isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)
    if not linear or qkv.out_features != 3 * dim or proj.in_features != dim:
        return None, "qkv / proj shapes do not match the head layout"
    edits = [ChannelEdit(_join(path, "qkv"), "weight", 0, (2 * dim,))]
    if qkv.bias is not None:
        edits.append(ChannelEdit(_join(path, "qkv"), "bias", 0, (2 * dim,)))
    for attr in ("q_bias", "v_bias"):  # separate q/v biases (other attention classes): not this layout
        if getattr(attn, attr, None) is not None:
            return None, f"attention has a separate {attr}"
    norm = getattr(attn, "norm", None)  # scale_norm: LayerNorm over the concatenated heads
    if norm is not None:
        norm_edits = _per_channel_edits(_join(path, "norm"), norm, dim)
        if norm_edits is None:
            return None, f"attention output norm ({type(norm).__name__}) is not per-channel"
        edits += norm_edits
    gate = getattr(attn, "gate", None)  # gated attention: gate rows multiply the head outputs
    if gate is not None:
        if not isinstance(gate, nn.Linear) or gate.out_features != dim:
            return None, "attention gate does not match the head layout"
        edits += _layer_edits(_join(path, "gate"), gate)
    return Fold(_join(path, "proj"), f"{path} (v heads -> proj)", tuple(edits), block=head_dim), None


def _resnet_folds(path: str, block: nn.Module) -> tuple[list[Fold], dict[str, str]]:
    """timm BasicBlock / Bottleneck: conv_k input <-> conv_{k-1} out channels (+ BN, + bias) inside
    the block; everything between them must be per-channel."""
    bottleneck = type(block).__name__ == "Bottleneck"
    chain = (
        [("conv1", ["bn1", "act1"], "conv2"), ("conv2", ["bn2", "drop_block", "act2", "aa"], "conv3")]
        if bottleneck
        else [("conv1", ["bn1", "drop_block", "act1", "aa"], "conv2")]
    )
    folds, reasons = [], {}
    for producer, between, consumer in chain:
        prod = getattr(block, producer)
        cons_path = _join(path, consumer)
        if not isinstance(prod, nn.Conv2d) or prod.groups != 1:
            reasons[cons_path] = f"producer {producer} is a grouped conv: its output channels cannot move freely"
            continue
        channels = prod.out_channels
        edits = list(_layer_edits(_join(path, producer), prod))
        ok = True
        for attr in between:
            sub = getattr(block, attr, None)
            if sub is None:
                continue
            sub_edits = _per_channel_edits(_join(path, attr), sub, channels)
            if sub_edits is None:
                reasons[cons_path] = (
                    f"{attr} ({type(sub).__name__}) between {producer} and {consumer} may not commute with a "
                    "channel permutation"
                )
                ok = False
                break
            edits += sub_edits
        if ok:
            folds.append(Fold(cons_path, f"{path} ({producer} -> {consumer})", tuple(edits)))
    reasons.setdefault(_join(path, "conv1"), RESIDUAL_REASON)
    return folds, reasons


def find_folds(model: nn.Module) -> tuple[dict[str, Fold], dict[str, str]]:
    """Producer->consumer couplings the model's structure supports, keyed by consumer name, and
    for layers known to have none, why (the rest get a generic reason)."""
    folds: dict[str, Fold] = {}
    reasons: dict[str, str] = {}
    for path, module in model.named_modules():
        kind = type(module).__name__
        # Only timm's own classes: the folds below rely on their forward code.
        if not type(module).__module__.startswith("timm."):
            kind = f"other:{kind}"
        if kind in ("Mlp", "GlobalResponseNormMlp", "GluMlp", "SwiGLU") and hasattr(module, "fc2"):
            fold, why = _mlp_fold(path, module)
            if fold:
                folds[fold.consumer] = fold
            else:
                reasons[_join(path, "fc2")] = why
        elif kind == "Attention" and all(hasattr(module, a) for a in ("qkv", "proj", "num_heads", "head_dim")):
            fold, why = _attention_fold(path, module)
            if fold:
                folds[fold.consumer] = fold
            else:
                reasons[_join(path, "proj")] = why
            reasons[_join(path, "qkv")] = LN_STREAM_REASON
        elif kind in ("BasicBlock", "Bottleneck") and all(hasattr(module, a) for a in ("conv1", "bn1", "conv2")):
            block_folds, block_reasons = _resnet_folds(path, module)
            folds.update({f.consumer: f for f in block_folds})
            reasons.update(block_reasons)
        elif kind == "Block" and hasattr(module, "mlp") and hasattr(module, "norm2"):
            reasons[_join(path, "mlp.fc1")] = LN_STREAM_REASON
            reasons[_join(path, "mlp.fc1_g")] = LN_STREAM_REASON
            reasons[_join(path, "mlp.fc1_x")] = LN_STREAM_REASON
        elif kind == "ConvNeXtBlock":
            reasons[_join(path, "mlp.fc1")] = DW_STREAM_REASON
        if path.endswith("downsample") and isinstance(module, nn.Module):
            for name, sub in module.named_modules():
                if isinstance(sub, nn.Conv2d):
                    reasons.setdefault(_join(path, name), RESIDUAL_REASON)
    return folds, reasons


def _full_index(size: int, offsets: tuple[int, ...], perm: torch.Tensor) -> torch.Tensor:
    idx = torch.arange(size, device=perm.device)
    for off in offsets:
        idx[off : off + perm.numel()] = perm + off
    return idx


def _edit_tensor(model: nn.Module, edit: ChannelEdit) -> torch.Tensor:
    return getattr(model.get_submodule(edit.module), edit.attr)


def apply_fold(model: nn.Module, fold: Fold, perm: torch.Tensor) -> None:
    """Reorder the consumer's input channels to `perm` (new j = old perm[j]) and the producers'
    matching output channels the same way, in place: the model's function does not change."""
    with torch.no_grad():
        consumer = model.get_submodule(fold.consumer).weight
        consumer.copy_(consumer.index_select(1, perm.to(consumer.device)))
        for edit in fold.producers:
            t = _edit_tensor(model, edit)
            p = perm.to(t.device)
            t.copy_(t.index_select(edit.dim, _full_index(t.shape[edit.dim], edit.offsets, p)))


def _shared_tensors(model: nn.Module) -> set[int]:
    """ids of tensors registered under more than one name (tied weights): never edit those."""
    seen: dict[int, int] = {}
    named = itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    for _, t in named:
        seen[id(t)] = seen.get(id(t), 0) + 1
    return {k for k, v in seen.items() if v > 1}


def _search_blocks(scores: torch.Tensor, pattern: NM, block: int | None, seconds: float | None, seed: int):
    """Search per consecutive block of columns (attention heads) or over all columns."""
    k = scores.shape[1]
    if not block or block >= k:
        return search_permutation(scores, pattern, seconds, seed)
    parts, before, after = [], 0.0, 0.0
    count = k // block
    for b in range(count):
        sub = scores[:, b * block : (b + 1) * block]
        perm, kb, ka = search_permutation(sub, pattern, None if seconds is None else seconds / count, seed + b)
        parts.append(perm + b * block)
        before, after = before + kb, after + ka
    return torch.cat(parts), before, after


def permute_model(
    model: nn.Module,
    eligible: list[LayerInfo],
    *,
    pattern: NM,
    saliency: str,
    stats: dict,
    seconds_per_layer: float | None,
    seed: int = 0,
) -> dict[str, dict]:
    """Search and fold input-channel permutations in place; the model's function is unchanged.

    Each consumer's permutation is searched on its own saliency (`wanda` with calibration stats when
    available, else magnitude; `block-cost` searches on wanda). Returns a JSON-able report per
    eligible layer; kept values are fractions of the layer's total saliency.
    """
    ctx = _Context(model, *find_folds(model), _shared_tensors(model), {}, pattern, saliency, stats or {},
                   seconds_per_layer, seed)
    report: dict[str, dict] = {}
    for layer in eligible:
        with _single_thread(math.prod(layer.weight_shape) * pattern.m < SINGLE_THREAD_ELEMENTS):
            report[layer.name] = _permute_layer(ctx, layer)
    return report


@dataclass(frozen=True)
class _Context:
    model: nn.Module
    folds: dict[str, Fold]
    reasons: dict[str, str]
    shared: set[int]
    edited: dict[tuple[int, int], str]  # (tensor id, dim) -> group that already moved it (mutated)
    pattern: NM
    saliency: str
    stats: dict
    seconds: float | None
    seed: int


def _permute_layer(ctx: _Context, layer: LayerInfo) -> dict:
    from mpdeploy.saliency import saliency_scores

    pattern = ctx.pattern
    layer_stats = ctx.stats.get(layer.name)
    if layer_stats is not None and layer_stats.col_sq_sum is None:  # no calibration input reached it
        layer_stats = None
    kind = "magnitude" if ctx.saliency == "magnitude" or layer_stats is None else "wanda"
    scores = saliency_scores(ctx.model.get_submodule(layer.name).weight, kind, layer_stats)
    total = float(scores.double().sum()) or 1.0
    before = kept_saliency(scores, pattern) / total
    entry = {
        "permuted": False,
        "reason": None,
        "kept_before": before,
        "kept_after": before,
        "unstructured_kept": unstructured_kept(scores, pattern.density) / total,
        "gap_recovered": 0.0,
        "seconds": 0.0,
        "group": None,
        "saliency": kind,
        "unstructured": UNSTRUCTURED_KIND,
    }
    fold = ctx.folds.get(layer.name)
    if fold is None:
        entry["reason"] = ctx.reasons.get(layer.name, NO_FOLD_REASON)
        if entry["reason"] in (LN_STREAM_REASON, DW_STREAM_REASON, RESIDUAL_REASON):
            entry["group"] = "residual stream"
        return entry
    entry["group"] = fold.group
    why = _fold_conflict(ctx.model, fold, ctx.shared, ctx.edited)
    if why is None and fold.block and fold.block % pattern.m:
        why = f"head_dim {fold.block} is not a multiple of M={pattern.m}: N:M groups would span heads (not done)"
    if why:
        entry["reason"] = why
        return entry
    start = time.perf_counter()
    perm, kb, ka = _search_blocks(scores, pattern, fold.block, ctx.seconds, ctx.seed)
    entry["seconds"] = time.perf_counter() - start
    if torch.equal(perm, torch.arange(perm.numel())):
        entry["reason"] = "the search found no order keeping more saliency than the current one"
        return entry
    apply_fold(ctx.model, fold, perm)
    for key in _fold_tensors(ctx.model, fold):
        ctx.edited[key] = fold.group
    entry.update(permuted=True, kept_before=kb / total, kept_after=ka / total)
    gap = entry["unstructured_kept"] - entry["kept_before"]
    entry["gap_recovered"] = (entry["kept_after"] - entry["kept_before"]) / gap if gap > 0 else 0.0
    logger.info("permuted %s: kept %.4f -> %.4f (%.0f%% of the gap to unstructured) in %.2fs",
                layer.name, entry["kept_before"], entry["kept_after"], 100 * entry["gap_recovered"], entry["seconds"])
    return entry


def _fold_tensors(model: nn.Module, fold: Fold) -> list[tuple[int, int]]:
    out = [(id(model.get_submodule(fold.consumer).weight), 1)]
    out += [(id(_edit_tensor(model, e)), e.dim) for e in fold.producers]
    return out


def _fold_conflict(model: nn.Module, fold: Fold, shared: set[int], edited: dict) -> str | None:
    """Why this fold must not be applied (tied weights, or channels another fold already moved)."""
    for t_id, dim in _fold_tensors(model, fold):
        if t_id in shared:
            return "a tensor of this group is shared with another module (tied weights): not permuted"
        if (t_id, dim) in edited:
            return f"these channels were already permuted by {edited[(t_id, dim)]}"
    return None
