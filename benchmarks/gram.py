"""SparseGPT's Gram sums against their share of the floor and against the BLAS's own symmetric kernels.

The prune's floor counts each Gram matrix ``XᵀX`` at its upper triangle, half the multiply-adds of a full
product, so at half a full product's time (``_floor.py``). This measures how close the kernels that exist
come to that, on smollm2-135m's input widths (576: the input of q/k/v, of o and of gate/up; 1536: the
input of down) and the prune's batch (2 x 1024 = 2048 rows), timed in interleaved rounds:

- ``full``: torch's ``XᵀX`` (one sgemm of torch's MKL); ``half``: the floor's share of it;
- ``blocks``: sparseheal's ``GramSum.add`` (the upper blocks, added to a running sum);
- ``mkl_ssyrk``: the symmetric rank-k update ``C = XᵀX`` (upper) of the MKL inside torch, called through
  its internal ``mkl_blas_ssyrk`` symbol with the Fortran argument order (this torch build has no public
  ssyrk; the column is left out where the symbol is absent);
- ``openblas_ssyrk``: ``scipy.linalg.blas.ssyrk`` (scipy's OpenBLAS; left out without scipy);

and whether each gives the full product's bits (a different BLAS is not expected to). The prune's
Gram seconds follow as (3 x the 576 time + the 1536 time) x layers x batches.

    python benchmarks/gram.py
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, print_table, write_json  # noqa: E402

from sparseheal.sparsity.gram import GramSum  # noqa: E402


def _mkl_ssyrk() -> ctypes._CFuncPtr | None:
    """torch's internal MKL ssyrk, or None."""
    lib = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        return ctypes.CDLL(str(lib)).mkl_blas_ssyrk
    except (OSError, AttributeError):
        return None


def _syrk_upper(fn, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` (d, d) lower triangle (row-major) = upper of ``xᵀx`` in column-major terms, by ``fn``."""
    n, d = x.shape  # row-major (n, d) is column-major (d, n): C = A Aᵀ with A that matrix
    ints = [ctypes.c_int(v) for v in (d, n, d, d)]  # n, k, lda, ldc
    one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
    fn(b"U", b"N", ctypes.byref(ints[0]), ctypes.byref(ints[1]), ctypes.byref(one),
       ctypes.c_void_p(x.data_ptr()), ctypes.byref(ints[2]), ctypes.byref(zero),
       ctypes.c_void_p(out.data_ptr()), ctypes.byref(ints[3]))
    return out


def _kernels(x: torch.Tensor) -> dict:
    """name -> (call, lower triangle of the (d, d) result as the full product lays it out)."""
    d = x.shape[1]
    summed = GramSum()
    summed.add(x)  # the first batch decides whether the blocks serve this shape

    def blocks() -> torch.Tensor:
        summed.add(x)
        return summed.total

    kernels = {"full": (lambda: x.t() @ x, torch.tril), "blocks": (blocks, torch.triu)}
    mkl = _mkl_ssyrk()
    if mkl is not None:
        out = torch.zeros(d, d)
        kernels["mkl_ssyrk"] = (lambda: _syrk_upper(mkl, x, out), torch.tril)
    try:
        from scipy.linalg.blas import ssyrk

        xn = x.numpy()
        kernels["openblas_ssyrk"] = (lambda: torch.from_numpy(ssyrk(1.0, xn, trans=1)), torch.triu)
    except ImportError:
        pass
    return kernels


def measure(d: int, rows: int, rounds: int) -> dict:
    x = torch.randn(rows, d, generator=torch.Generator().manual_seed(d)) * torch.rand(d) * 3
    kernels = _kernels(x)
    times: dict = {name: [] for name in kernels}
    for _ in range(rounds):
        for name, (fn, _) in kernels.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    full = x.t() @ x
    ref = {"tril": torch.tril(full), "triu": torch.triu(full)}
    row = {"width": d, "rows": rows}
    for name, (fn, part) in kernels.items():
        row[f"{name}_ms"] = round(statistics.median(times[name]) * 1e3, 2)
        if name == "blocks":  # a running sum: compare one batch's worth
            one = GramSum()
            one.add(x)
            row["blocks_bits"] = torch.equal(part(one.value()), ref["triu"])
        elif name != "full":
            row[f"{name}_bits"] = torch.equal(part(fn()), ref["tril" if part is torch.tril else "triu"])
    row["half_ms"] = round(row["full_ms"] / 2, 2)
    for name in kernels:
        row[f"{name}_x_half"] = round(row[f"{name}_ms"] / row["half_ms"], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048, help="tokens per batch (2 x 1024 in the prune)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--batches", type=int, default=32)
    parser.add_argument("--output", default="benchmarks/results/gram.json")
    args = parser.parse_args()
    rows = [measure(d, args.rows, args.rounds) for d in (576, 1536)]
    names = [k[:-3] for k in rows[0] if k.endswith("_ms") and k != "half_ms"]
    per_prune = {name: round((3 * rows[0][f"{name}_ms"] + rows[1][f"{name}_ms"]) * args.layers
                             * args.batches / 1e3, 1) for name in [*names, "half"]}
    print_table(rows, ["width", *[f"{n}_ms" for n in names], "half_ms", *[f"{n}_x_half" for n in names]])
    print("seconds per prune (3 x 576 + 1536, x layers x batches):", per_prune)
    write_json(Path(args.output), {"settings": vars(args), "machine": machine(), "rows": rows,
                                   "prune_gram_s": per_prune})


if __name__ == "__main__":
    main()
