#!/usr/bin/python3
"""bench_ode.py - the spiral vector field of bench_ode.c, in imp and in
scipy.integrate.solve_ivp, side by side.

The field is g(y) = W2 tanh(W1 y^3 + b1) + b2 with 50 hidden units, a
batch of 20 initial states, 10 output times on [0, 5], rtol 1e-7 and atol
1e-9 on both sides.  imp integrates with CVODES' Adams method (fixed-point
iteration), as one system and per sample.  scipy integrates the same
batch with solve_ivp, as one vectorized system of 40 equations (numpy
evaluates the field for the whole batch at once) and per sample, with
RK45 (its default), DOP853 and LSODA (ODEPACK's Adams/BDF, the method
closest to CVODES' Adams).  Every scipy result is checked against imp's
trajectories; the ratio printed is scipy's time over imp's for the same
batch mode (above 1: imp is faster).

This script builds nothing.  It runs the C benchmark (path as the first
argument, default build/bench/bench_ode), which writes the weights, the
initial states, the times and its own trajectories to a temporary file,
and prints its timings (and, besides, its overhead and gradient-scaling
figures, which are passed through).  Both sides run on one thread.

Usage: /usr/bin/python3 bench/bench_ode.py [bench_ode [repetitions]]
(Debian: apt-get install python3-scipy)
"""
import os
import subprocess
import sys
import tempfile
import time

os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402
from scipy.integrate import solve_ivp  # noqa: E402

HIDDEN = 50
BATCH = 20
TIMES = 10
D = 2
RTOL = 1e-7
ATOL = 1e-9


def run_c(binary, data, quick):
    """Run the C benchmark; echo its lines and return, for each key=value
    line, its first key with its value."""
    args = [binary, "--data", data] + (["--quick"] if quick else [])
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    out = subprocess.run(args, env=env, check=True, capture_output=True,
                         text=True).stdout
    values = {}
    for line in out.splitlines():
        print(line)
        if not line.startswith("#") and "=" in line:
            key, value = line.split()[0].split("=", 1)
            values[key] = value
    return values


def load(data):
    raw = np.fromfile(data, dtype=np.float64)
    ntheta = 5 * HIDDEN + D
    sizes = [ntheta, BATCH * D, TIMES, BATCH * TIMES * D]
    parts, at = [], 0
    for n in sizes:
        parts.append(raw[at:at + n])
        at += n
    if at != raw.size:
        sys.exit("bench_ode.py: unexpected data file size %d" % raw.size)
    theta, x, times, y = parts
    h = HIDDEN
    w1 = theta[:2 * h].reshape(h, D)
    b1 = theta[2 * h:3 * h]
    w2 = theta[3 * h:5 * h].reshape(D, h)
    b2 = theta[5 * h:]
    return (w1, b1, w2, b2), x.reshape(BATCH, D), times, \
        y.reshape(BATCH, TIMES, D)


def field(params):
    """The vector field on a flat batch (n * 2,) -> (n * 2,)."""
    w1, b1, w2, b2 = params

    def g(t, flat):
        y = flat.reshape(-1, D)
        a = np.tanh((y ** 3) @ w1.T + b1)
        return (a @ w2.T + b2).ravel()
    return g


def solve(params, x, times, method, per_sample):
    """Trajectories (BATCH, TIMES, D) and the number of g evaluations."""
    g = field(params)
    span = (0.0, times[-1])
    if not per_sample:
        sol = solve_ivp(g, span, x.ravel(), method=method, t_eval=times,
                        rtol=RTOL, atol=ATOL)
        if not sol.success:
            sys.exit("solve_ivp %s failed: %s" % (method, sol.message))
        return sol.y.T.reshape(TIMES, BATCH, D).transpose(1, 0, 2), sol.nfev
    out = np.empty((BATCH, TIMES, D))
    nfev = 0
    for b in range(BATCH):
        sol = solve_ivp(g, span, x[b], method=method, t_eval=times,
                        rtol=RTOL, atol=ATOL)
        if not sol.success:
            sys.exit("solve_ivp %s failed: %s" % (method, sol.message))
        out[b] = sol.y.T
        nfev += sol.nfev
    return out, nfev


def timed(fn, reps):
    """Medians of wall-clock and CPU seconds over reps calls, and the last
    result."""
    wall, cpu = [], []
    result = None
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.thread_time()
        result = fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.thread_time() - c0)
    return float(np.median(wall)), float(np.median(cpu)), result


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else "build/bench/bench_ode"
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "spiral.bin")
        values = run_c(binary, data, quick=reps < 7)
        params, x, times, y_imp = load(data)

    imp_ms = {mode: float(values["spiral_forward_%s_ms" % mode])
              for mode in ("system", "samples")}
    imp_cpu = {mode: float(values["spiral_forward_%s_cpu_ms" % mode])
               for mode in ("system", "samples")}
    scale = np.abs(y_imp).max()
    print("# scipy.integrate.solve_ivp on the same batch, rtol %g, atol %g; "
          "ratio = scipy / imp (wall clock, thread CPU)" % (RTOL, ATOL))
    for per_sample in (False, True):
        mode = "samples" if per_sample else "system"
        for method in ("RK45", "DOP853", "LSODA"):
            wall, cpu, (y, nfev) = timed(
                lambda: solve(params, x, times, method, per_sample), reps)
            diff = np.abs(y - y_imp).max() / scale
            print("scipy_%s_%s_ms=%.3f cpu_ms=%.3f nfev=%d ratio=%.2f "
                  "cpu_ratio=%.2f agree=%.2g"
                  % (method, mode, 1e3 * wall, 1e3 * cpu, nfev,
                     1e3 * wall / imp_ms[mode], 1e3 * cpu / imp_cpu[mode],
                     diff))
            if diff > 1e-4:
                sys.exit("bench_ode.py: %s (%s) disagrees with imp by %g"
                         % (method, mode, diff))


if __name__ == "__main__":
    main()
