#!/usr/bin/python3
"""Dense and 3x3 convolution layers: imp against PyTorch, side by side.

Runs the C benchmark (bench_blocks, which also times the bare OpenBLAS
GEMMs of each layer) and the same layers in PyTorch, in double precision,
at the same sizes, and prints the times and the ratios imp / GEMM floor and
imp / torch.  Both sides are pinned to the same number of threads (default
1): OPENBLAS_NUM_THREADS and the C bench's argument for imp,
torch.set_num_threads for PyTorch.

    dense   batch 64, 256 -> 256, bias
    conv    batch 32, 16 -> 16 channels, 32 x 32, 3x3, padding 1, bias

"fwd" is one forward pass (PyTorch under no_grad); "fwdbwd" is a forward
pass and a backward pass giving the gradients of the input, the weight and
the bias.  Each time is the best per-call mean over several rounds, and
the C and PyTorch runs alternate --repeat times, keeping each case's best,
so that the load of a shared machine reaches both sides alike.

Usage: /usr/bin/python3 bench/bench_blocks.py [path/to/bench_blocks]
       [--threads N]
(Debian's python3-torch: apt-get install python3-torch; the system python
is /usr/bin/python3.)
"""

import argparse
import os
import re
import subprocess
import sys
import time

ROUNDS = 11
ROUND_SECONDS = 0.1


def best_time(fn):
    """The best mean seconds per call of fn over ROUNDS rounds."""
    fn()
    start = time.perf_counter()
    fn()
    reps = int(ROUND_SECONDS / (time.perf_counter() - start + 1e-9)) + 1
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - start) / reps)
    return best


C_CONFIG = []


def run_c_bench(path, threads):
    """The C bench's results: {case: {key: value}}."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads))
    out = subprocess.run([path, str(threads)], env=env, check=True,
                         capture_output=True, text=True).stdout
    results = {}
    for line in out.splitlines():
        if line.startswith("openblas_threads=") and not C_CONFIG:
            C_CONFIG.append(line)
        fields = dict(re.findall(r"(\w+)=(\S+)", line))
        if "case" in fields:
            results[fields["case"]] = {k: float(v) for k, v in fields.items()
                                       if k != "case"}
    return results


def torch_times(threads):
    """PyTorch's seconds per call for each case, in float64."""
    # PyTorch's float64 GEMMs go to the system BLAS (OpenBLAS here), which
    # reads its thread count when it is loaded.
    os.environ["OPENBLAS_NUM_THREADS"] = str(threads)
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dt = torch.float64
    cases = {}

    def add(name, x, weight, bias, op):
        ybar = torch.randn_like(op(x, weight, bias))
        params = (x, weight, bias)

        def forward():
            with torch.no_grad():
                op(x, weight, bias)

        def forward_backward():
            for p in params:
                p.grad = None
            op(x, weight, bias).backward(ybar)

        for p in params:
            p.requires_grad_(True)
        cases[name + "_fwd"] = best_time(forward)
        cases[name + "_fwdbwd"] = best_time(forward_backward)

    add("dense", torch.randn(64, 256, dtype=dt),
        torch.randn(256, 256, dtype=dt) * 0.06,
        torch.randn(256, dtype=dt), F.linear)
    add("conv", torch.randn(32, 16, 32, 32, dtype=dt),
        torch.randn(16, 16, 3, 3, dtype=dt) * 0.08,
        torch.randn(16, dtype=dt),
        lambda x, w, b: F.conv2d(x, w, b, padding=1))
    return cases


def print_versions():
    import torch

    print("imp:   " + (C_CONFIG[0] if C_CONFIG else "?"))
    print("torch: version=%s threads=%d (OPENBLAS_NUM_THREADS=%s)" % (
        torch.__version__, torch.get_num_threads(),
        os.environ.get("OPENBLAS_NUM_THREADS")))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", nargs="?", default="build/bench/bench_blocks")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3,
                        help="alternate the C and PyTorch runs this many "
                        "times and keep each case's best (default 3)")
    args = parser.parse_args()

    # Alternate the two sides, so that a change in the machine's load
    # reaches both, and keep the best time of each case.
    imp, gemm, torch = {}, {}, {}
    for _ in range(max(1, args.repeat)):
        for case, r in run_c_bench(args.bench, args.threads).items():
            imp[case] = min(r["imp_ms"], imp.get(case, r["imp_ms"]))
            gemm[case] = min(r["gemm_ms"], gemm.get(case, r["gemm_ms"]))
        for case, t in torch_times(args.threads).items():
            torch[case] = min(1e3 * t, torch.get(case, 1e3 * t))
    print_versions()

    print()
    print("%-14s %10s %10s %10s %9s %9s" % ("case", "imp ms", "gemm ms",
                                            "torch ms", "imp/gemm",
                                            "imp/torch"))
    for case, t_torch in torch.items():
        if case not in imp:
            print("%-14s missing from the C bench" % case, file=sys.stderr)
            continue
        print("%-14s %10.4f %10.4f %10.4f %9.2f %9.2f" % (
            case, imp[case], gemm[case], t_torch, imp[case] / gemm[case],
            imp[case] / t_torch))

if __name__ == "__main__":
    main()
