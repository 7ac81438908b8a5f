"""Plain re-implementations of the reference procedures (the Wanda code's variant and weight-update
ablations, RIA's score and reallocation, DSnoT's swaps), loop by loop as their authors' code runs them,
for the tests to compare sparseheal's vectorised methods with. Differences from the authors' code that
sparseheal documents are kept here too (an exact pruned count, ties by position)."""

from __future__ import annotations

import torch


def lowest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k lowest values of a 1-D tensor, ties by position."""
    return torch.sort(values, stable=True).indices[:k]


def variant_keep(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Wanda's --use_variant: row by row, alpha bisected as return_given_alpha is."""
    ordered = [torch.sort(row, stable=True).values for row in scores]

    def pruned_at(alpha: float) -> tuple[torch.Tensor, float]:
        pruned = torch.zeros_like(scores, dtype=torch.bool)
        for r, row in enumerate(scores):
            cum = torch.cumsum(ordered[r], dim=0)
            count = int((cum <= alpha * row.sum()).sum())
            if count:
                pruned[r] = row <= ordered[r][count - 1]
        return pruned, float(pruned.sum()) / pruned.numel()

    alpha, low, high = 0.4, 0.0, 0.8
    pruned, cur = pruned_at(alpha)
    while abs(cur - sparsity) > 0.001 and high - low >= 0.001:
        if cur > sparsity:
            alpha, high = (alpha + low) / 2, alpha
        else:
            alpha, low = (alpha + high) / 2, alpha
        pruned, cur = pruned_at(alpha)
    return ~pruned


def fasterprune(weight: torch.Tensor, hessian: torch.Tensor, score, fixed_keep: torch.Tensor | None,
                nm: tuple[int, int] | None, sparsity: float, blocksize: int, percdamp: float = 0.01):
    """AblateGPT.fasterprune: ``score(W1_block (out, b), first column)`` picks the pruned set per block
    (or per N:M group), unless ``fixed_keep`` is given. Returns (weight, keep-mask)."""
    w = weight.clone().float()
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(percdamp * torch.mean(torch.diag(h)))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    cols = w.shape[1]
    pruned_all = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, h1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        if fixed_keep is not None:
            mask1 = ~fixed_keep[:, i1:i2]
        elif nm is None:
            tmp = score(w1, h1.diagonal(), i1)
            mask1 = torch.zeros(tmp.numel(), dtype=torch.bool)
            mask1[lowest(tmp.flatten(), int(tmp.numel() * sparsity))] = True
            mask1 = mask1.reshape(tmp.shape)
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and fixed_keep is None and i % nm[1] == 0:
                tmp = score(w1[:, i : i + nm[1]], h1.diagonal()[i : i + nm[1]], i1 + i)
                for r in range(tmp.shape[0]):
                    mask1[r, i + lowest(tmp[r], nm[1] - nm[0])] = True
            col, d = w1[:, i], h1[i, i]
            q = col.clone()
            q[mask1[:, i]] = 0
            q1[:, i] = q
            e = (col - q) / d
            w1[:, i:] -= e.unsqueeze(1).matmul(h1[i, i:].unsqueeze(0))
            err1[:, i] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
        pruned_all[:, i1:i2] = mask1
    return w, ~pruned_all


def dsnot(original, current, keep, s, var, mean_sq, nm, cycles, threshold, power):
    """DSnoT's swaps, one row at a time."""
    keep = keep.clone()
    d0, d1 = original.float() * s, current.float() * s
    err_all = (d0 - d1).sum(dim=1)
    gain = torch.where(var.pow(power) > 0, d0 / var.pow(power), torch.zeros_like(d0))
    score = current.float().abs() * mean_sq.sqrt()
    for r in range(keep.shape[0]):
        err = err_all[r]
        pruned = [int(j) for j in torch.nonzero(~keep[r]).flatten()]
        pruned.sort(key=lambda j: (float(gain[r, j]), j))
        kept = [int(j) for j in torch.nonzero(keep[r]).flatten()]
        neg = sorted((j for j in kept if d1[r, j] < 0), key=lambda j: (float(score[r, j]), j))
        pos = sorted((j for j in kept if d1[r, j] > 0), key=lambda j: (float(score[r, j]), j))
        low, high, pn, pp, regrown = 0, len(pruned) - 1, 0, 0, set()
        for _ in range(cycles):
            if not (abs(float(err)) > threshold and low <= high):
                break
            up = bool(err > 0)
            grown = pruned[high] if up else pruned[low]
            if nm is None:
                if (pn >= len(neg)) if up else (pp >= len(pos)):
                    break
                cut = neg[pn] if up else pos[pp]
            else:
                start = grown - grown % nm[1]
                free = [j for j in range(start, min(start + nm[1], keep.shape[1]))
                        if keep[r, j] and j not in regrown]
                if not free:
                    break
                cut = min(free, key=lambda j: (float(score[r, j]), j))
                if torch.sign(err + (d1[r, cut] - d0[r, grown])) != torch.sign(err):
                    break
            keep[r, grown], keep[r, cut] = True, False
            regrown.add(grown)
            err = err + (d1[r, cut] - d0[r, grown])
            if up:
                high, pn = high - 1, pn + 1
            else:
                low, pp = low + 1, pp + 1
    return keep
