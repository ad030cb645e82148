#!/usr/bin/python3
"""bench/bench_qp.py - imp's QP forward against cvxopt's, on the same QPs.

bench_qp (the C binary) makes a batch of random feasible QPs (see
bench_qp.c), times imp's forward and backward and the LAPACK floor, and
writes the problems with imp's solutions.  This script then solves the same
problems with cvxopt.solvers.qp (Debian's python3-cvxopt) and prints the
times side by side, with how far the two solutions differ.  Each solution's
error is measured against imp's at tol 1e-12 (which cvxopt at
abstol = reltol = feastol = 1e-10 agrees with to 5e-8 in z), so
that the times can be read at matched accuracy too.

imp runs twice: at its default tolerance (1e-10) and at 1e-7, near
cvxopt's defaults (abstol 1e-7, reltol 1e-6, feastol 1e-7).  Both libraries
get one BLAS thread (OPENBLAS_NUM_THREADS=1, set before numpy loads), and
both are timed in CPU time of their process (clock_gettime's
CLOCK_PROCESS_CPUTIME_ID, time.process_time), best of R runs, so that other
load on a shared machine does not count.

Usage: /usr/bin/python3 bench/bench_qp.py [BENCH_QP] [--batch B] [--n N]
       [--m M] [--reps R]
BENCH_QP defaults to build/bench/bench_qp.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from cvxopt import matrix, solvers  # noqa: E402


def run_imp(binary, args, tol, path=None, reps=None):
    """Run bench_qp; return its JSON figures."""
    cmd = [binary, "--batch", str(args.batch), "--n", str(args.n),
           "--m", str(args.m), "--reps", str(reps or args.reps),
           "--tol", str(tol)]
    if path is not None:
        cmd += ["--write", path]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def read_problems(path):
    """The problems and imp's solutions as bench_qp wrote them."""
    with open(path, "rb") as f:
        batch, n, m = np.fromfile(f, dtype=np.int64, count=3)
        Q = np.fromfile(f, dtype=np.float64, count=batch * n * n)
        p = np.fromfile(f, dtype=np.float64, count=batch * n)
        G = np.fromfile(f, dtype=np.float64, count=batch * m * n)
        h = np.fromfile(f, dtype=np.float64, count=batch * m)
        y = np.fromfile(f, dtype=np.float64, count=batch * (n + m))
    return (Q.reshape(batch, n, n), p.reshape(batch, n),
            G.reshape(batch, m, n), h.reshape(batch, m),
            y.reshape(batch, n + m)[:, :n])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("binary", nargs="?", default="build/bench/bench_qp")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--m", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    # imp: the problems, its solutions and its times.
    with tempfile.TemporaryDirectory() as tmp:
        path = [os.path.join(tmp, f"qp{i}.bin") for i in range(3)]
        tight = run_imp(args.binary, args, 1e-10, path[0])
        loose = run_imp(args.binary, args, 1e-7, path[1])
        run_imp(args.binary, args, 1e-12, path[2], reps=1)
        Q, p, G, h, z_imp = read_problems(path[0])
        z_loose = read_problems(path[1])[4]
        z_ref = read_problems(path[2])[4]

    # cvxopt on the same problems, best of reps; conversions not timed.
    solvers.options["show_progress"] = False
    data = [(matrix(Q[k]), matrix(p[k]), matrix(G[k]), matrix(h[k]))
            for k in range(len(Q))]
    best, sols, iters = float("inf"), None, []
    for _ in range(args.reps):
        t0 = time.process_time()
        res = [solvers.qp(*d) for d in data]
        best = min(best, time.process_time() - t0)
        sols = res
    status = {r["status"] for r in sols}
    iters = [r["iterations"] for r in sols]
    z_cvx = np.array([np.array(r["x"]).ravel() for r in sols])

    # Agreement, in the solutions and the objectives.
    def objective(z):
        return np.einsum("ki,kij,kj->k", z, Q, z) / 2 + np.einsum(
            "ki,ki->k", p, z)

    f_imp, f_cvx = objective(z_imp), objective(z_cvx)
    dz = np.max(np.abs(z_imp - z_cvx))
    df = np.max(np.abs(f_imp - f_cvx) / np.maximum(1.0, np.abs(f_imp)))
    f_ref = objective(z_ref)

    def error(z):
        """Largest |z - z_ref| and relative objective error."""
        return (np.max(np.abs(z - z_ref)), np.max(
            np.abs(objective(z) - f_ref) / np.maximum(1.0, np.abs(f_ref))))

    fb = tight["forward_s"] + tight["backward_s"]
    floor = tight["floor_chol_s"] + tight["floor_lu_s"]
    print(f"{args.batch} random feasible QPs, n = {args.n}, "
          f"m = {args.m} inequalities, best of {args.reps}, "
          f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}")
    print(f"  imp forward, tol 1e-10     {1e3 * tight['forward_s']:9.1f} ms"
          f"   ({tight['iterations_mean']:.1f} iterations on average)")
    print(f"  imp forward, tol 1e-7      {1e3 * loose['forward_s']:9.1f} ms"
          f"   ({loose['iterations_mean']:.1f} iterations on average)")
    print(f"  cvxopt solvers.qp          {1e3 * best:9.1f} ms"
          f"   ({np.mean(iters):.1f} iterations on average, "
          f"status {', '.join(sorted(status))})")
    print(f"  cvxopt / imp forward       {best / tight['forward_s']:9.2f} x"
          f" (tol 1e-10), {best / loose['forward_s']:.2f} x (tol 1e-7)")
    print(f"  cvxopt / forward's floor   {best / loose['floor_forward_s']:9.2f} x"
          f" (tol 1e-7: the kernels of imp's iteration alone, "
          f"{1e3 * loose['floor_forward_s']:.1f} ms)")
    print(f"  solutions: max |z_imp - z_cvxopt| = {dz:.2e}, max relative "
          f"objective difference {df:.2e}")
    print("  errors against imp at tol 1e-12 (max |dz|, max relative "
          "objective error):")
    for name, z in (("imp, tol 1e-10", z_imp), ("imp, tol 1e-7", z_loose),
                    ("cvxopt", z_cvx)):
        ez, ef = error(z)
        print(f"    {name:16s} {ez:9.2e} {ef:9.2e}")
    print(f"  imp backward               {1e3 * tight['backward_s']:9.1f} ms")
    print(f"  floor (LAPACK factorizations alone) "
          f"{1e3 * floor:9.1f} ms: dpotrf "
          f"{1e3 * tight['floor_chol_s']:.1f}, dgetrf "
          f"{1e3 * tight['floor_lu_s']:.1f}")
    print(f"  imp forward + backward / floor {fb / floor:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
