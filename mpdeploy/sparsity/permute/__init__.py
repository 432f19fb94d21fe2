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
