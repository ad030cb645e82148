#!/usr/bin/python3
"""bench_deq.py - the dense DEQ of bench_deq.c, in imp and in PyTorch, side
by side.

The DEQ is z = tanh(W z + U x + b), width 256, input width 256, batch 64,
double precision.  Both sides run the same solver with the same settings:
Anderson acceleration with memory 5 from z = 0, stopping when every
sample's relative residual ||h(z) - z|| / ||h(z)|| is at most 1e-6 (at most
100 iterations), the mixing weights from the regularized Gram system
(F^T F + 1e-10 diag(F^T F)) y = 1, alpha = y / sum(y); the implicit
backward is the adjoint fixed point u = (dh/dz)^T u + ybar by the same
Anderson.  In PyTorch the solver is batched (one torch.linalg.solve for the
batch's small mixing systems per iteration) and the backward is a
torch.autograd.Function whose backward builds the graph of h once at z*
and takes one autograd.grad of it per adjoint iteration.

This script builds nothing.  It runs the C benchmark (path as the first
argument, default build/bench/bench-deq), which writes its weights, inputs,
cotangent and results to a temporary file; the PyTorch side reads them
with numpy.fromfile, checks that it reaches the same fixed point and
gradients, and is timed the same way (median of the repetitions of one
forward + backward).  Both sides run on one thread: OPENBLAS_NUM_THREADS=1
for the C binary (which also pins OpenBLAS itself) and
torch.set_num_threads(1).

Usage: /usr/bin/python3 bench/bench_deq.py [bench-deq [repetitions]]
"""
import os
import subprocess
import sys
import tempfile
import time

# Pin threads before torch (and its BLAS) is loaded.
os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

MEMORY = 5
RTOL = 1e-6
MAX_ITER = 100
RIDGE = 1e-10


def run_c(binary, data, reps):
    """Run the C benchmark; return its key=value lines as a dict."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    out = subprocess.run([binary, data, str(reps)], env=env, check=True,
                         capture_output=True, text=True).stdout
    values = {}
    for line in out.splitlines():
        if line.startswith("#"):
            print(line)
        elif "=" in line:
            key, value = line.split("=", 1)
            values[key] = value
    return values


def read_data(path, nz, nx, n):
    """Weights, inputs, cotangent and the C side's results."""
    sizes = [("W", nz * nz), ("U", nz * nx), ("b", nz), ("x", n * nx),
             ("ybar", n * nz), ("z", n * nz), ("xbar", n * nx),
             ("Wbar", nz * nz), ("Ubar", nz * nx), ("bbar", nz)]
    raw = np.fromfile(path, dtype="<f8")
    assert raw.size == sum(s for _, s in sizes), "data file size"
    shapes = {"W": (nz, nz), "U": (nz, nx), "b": (nz,), "x": (n, nx),
              "ybar": (n, nz), "z": (n, nz), "xbar": (n, nx),
              "Wbar": (nz, nz), "Ubar": (nz, nx), "bbar": (nz,)}
    arrays, offset = {}, 0
    for name, size in sizes:
        arrays[name] = torch.from_numpy(
            raw[offset:offset + size].reshape(shapes[name]).copy())
        offset += size
    return arrays


def anderson(g_of, z, stats, m=MEMORY, rtol=RTOL, max_iter=MAX_ITER):
    """Anderson acceleration on the batch z (n x d); g_of(z) is the map.

    Stops when every row's relative residual is within rtol; returns the
    last iterate and counts iterations and row evaluations in stats.
    """
    n, d = z.shape
    f_hist = z.new_zeros(n, m, d)  # residuals g - z, a ring
    g_hist = z.new_zeros(n, m, d)  # images g
    ones = z.new_ones(n, m, 1)
    for k in range(max_iter):
        g = g_of(z)
        stats["iterations"] += 1
        stats["evaluations"] += n
        f = g - z
        gn = g.norm(dim=1)
        rel = f.norm(dim=1) / torch.where(gn > 0, gn, torch.ones(1))
        if rel.max().item() <= rtol:
            break
        f_hist[:, k % m] = f
        g_hist[:, k % m] = g
        kk = min(k + 1, m)
        if kk < 2:
            z = g
            continue
        fk = f_hist[:, :kk]
        gram = torch.bmm(fk, fk.transpose(1, 2))
        gram = gram + RIDGE * torch.diag_embed(
            gram.diagonal(dim1=1, dim2=2))
        y = torch.linalg.solve(gram, ones[:, :kk])
        alpha = y / y.sum(dim=1, keepdim=True)
        z = torch.bmm(alpha.transpose(1, 2), g_hist[:, :kk]).squeeze(1)
    stats["residual"] = rel.max().item()
    return z


def h(x, z, W, U, b):
    return torch.tanh(z @ W.T + x @ U.T + b)


class DEQ(torch.autograd.Function):
    """z* = h(x, z*), with the implicit gradient by the adjoint fixed
    point."""

    @staticmethod
    def forward(ctx, x, W, U, b, stats):
        with torch.no_grad():
            z = anderson(lambda z: h(x, z, W, U, b),
                         x.new_zeros(x.shape[0], W.shape[0]),
                         stats["forward"])
        ctx.save_for_backward(z, x, W, U, b)
        ctx.stats = stats
        return z

    @staticmethod
    def backward(ctx, ybar):
        z, x, W, U, b = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (z, x, W, U, b)]
            h0 = h(leaves[1], leaves[0], *leaves[2:])

            def adjoint_map(u):
                return torch.autograd.grad(h0, leaves[0], u,
                                           retain_graph=True)[0] + ybar

            u = anderson(adjoint_map, torch.zeros_like(ybar),
                         ctx.stats["backward"])
            grads = torch.autograd.grad(h0, leaves[1:], u)
        return (*grads, None)


def new_stats():
    return {"forward": {"iterations": 0, "evaluations": 0},
            "backward": {"iterations": 0, "evaluations": 0}}


def torch_forward_backward(data, stats, times=None):
    """One forward + backward; appends (forward s, backward s, CPU s of
    this thread) to times."""
    x = data["x"].clone().requires_grad_()
    params = [data[k].clone().requires_grad_() for k in ("W", "U", "b")]
    c0 = time.thread_time()
    t0 = time.perf_counter()
    z = DEQ.apply(x, *params, stats)
    t1 = time.perf_counter()
    z.backward(data["ybar"])
    t2 = time.perf_counter()
    if times is not None:
        times.append((t1 - t0, t2 - t1, time.thread_time() - c0))
    return z.detach(), x.grad, [p.grad for p in params]


def rel_diff(a, b):
    return ((a - b).norm() / b.norm()).item()


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else "build/bench/bench-deq"
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 21
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "deq.bin")
        c = run_c(binary, path, reps)
        nz, nx, n = int(c["nz"]), int(c["nx"]), int(c["batch"])
        data = read_data(path, nz, nx, n)
    print("# threads: C OpenBLAS %s (OPENBLAS_NUM_THREADS=1), torch %d "
          "(torch.set_num_threads(1)); torch %s, numpy %s" %
          (c["openblas_threads"], torch.get_num_threads(), torch.__version__,
           np.__version__))
    print("# ||W||_2 = %.6f (numpy.linalg.norm(W, 2)); spectral radius of "
          "dh/dz at z* %s (imp_deq_spectral_radius)" %
          (np.linalg.norm(data["W"].numpy(), 2),
           c["jacobian_spectral_radius"]))

    # The same fixed point and gradients as the C side.
    stats = new_stats()
    z, xbar, (wbar, ubar, bbar) = torch_forward_backward(data, stats)
    print("# torch against imp, relative difference: z* %.1e, xbar %.1e, "
          "Wbar %.1e, Ubar %.1e, bbar %.1e (both solved to %g)" %
          (rel_diff(z, data["z"]), rel_diff(xbar, data["xbar"]),
           rel_diff(wbar, data["Wbar"]), rel_diff(ubar, data["Ubar"]),
           rel_diff(bbar, data["bbar"]), RTOL))

    # Timing: the median of the repetitions, after that warm-up.
    times = []
    for _ in range(reps):
        stats = new_stats()
        torch_forward_backward(data, stats, times)
    fwd, bwd, cpu = (np.array(t) for t in zip(*times))
    t_fwd, t_bwd = np.median(fwd) * 1e3, np.median(bwd) * 1e3
    t_total, t_cpu = np.median(fwd + bwd) * 1e3, np.median(cpu) * 1e3
    t_best = np.min(fwd + bwd) * 1e3
    sf, sb = stats["forward"], stats["backward"]

    print()
    print("%-34s %12s %12s" % ("", "imp (C)", "torch"))
    print("%-34s %12s %12d" % ("forward iterations", c["iterations"],
                               sf["iterations"]))
    print("%-34s %12s %12d" % ("forward evaluations of h (rows)",
                               c["evaluations"], sf["evaluations"]))
    print("%-34s %12s %12d" % ("adjoint iterations",
                               c["backward_iterations"], sb["iterations"]))
    print("%-34s %12s %12d" % ("adjoint vjp calls (whole batch)",
                               c["backward_vjp_calls"], sb["iterations"] + 1))
    print("%-34s %12s %12.1e" % ("forward relative residual",
                                 c["forward_rel_residual"], sf["residual"]))
    print("%-34s %12.3f %12.3f" % ("forward ms", float(c["forward_ms"]),
                                   t_fwd))
    print("%-34s %12.3f %12.3f" % ("backward ms", float(c["backward_ms"]),
                                   t_bwd))
    print("%-34s %12.3f %12.3f" % ("forward + backward ms",
                                   float(c["total_ms"]), t_total))
    print("%-34s %12.3f %12.3f" % ("  the same, CPU time of the thread",
                                   float(c["cpu_total_ms"]), t_cpu))
    print("%-34s %12.3f %12.3f" % ("  the fastest repetition",
                                   float(c["best_total_ms"]), t_best))
    print()
    print("imp: GEMM floor %.3f ms (%s GEMMs: forward %.3f ms, backward "
          "%.3f ms)\n     imp / floor = %.2f (target <= 3); in CPU time "
          "%.2f; fastest against fastest %.2f" %
          (float(c["floor_ms"]), c["gemms"], float(c["floor_forward_ms"]),
           float(c["floor_backward_ms"]), float(c["ratio_floor"]),
           float(c["ratio_floor_cpu"]), float(c["ratio_floor_best"])))
    print("imp: time in the map and vjp callbacks %.3f ms, so %.3f ms in "
          "the solver and layer" %
          (float(c["callbacks_ms"]),
           float(c["total_ms"]) - float(c["callbacks_ms"])))
    print("torch / imp = %.2f (target >= 20), forward %.2f, backward %.2f; "
          "in CPU time %.2f;\n     fastest against fastest %.2f" %
          (t_total / float(c["total_ms"]), t_fwd / float(c["forward_ms"]),
           t_bwd / float(c["backward_ms"]), t_cpu / float(c["cpu_total_ms"]),
           t_best / float(c["best_total_ms"])))
    print("torch / GEMM floor = %.2f: no implementation of these GEMMs can "
          "be more than that much faster than torch" %
          (t_total / float(c["floor_ms"])))
    print("load average during the run: %s" %
          " ".join(open("/proc/loadavg").read().split()[:3]))


if __name__ == "__main__":
    main()
