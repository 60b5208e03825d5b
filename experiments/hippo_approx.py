"""Online function approximation with HiPPO: reconstruction error vs order N, per measure.

    .venv/bin/python experiments/hippo_approx.py --out docs/results/hippo_approx

A standalone script (not a sweep study): about 5 s on a shared 2-core CPU, NumPy only.

One band-limited random signal (12 sinusoids, frequencies uniform in [0, 4] cycles per unit time,
fixed seed, a smooth onset over [0, 0.25] so the zero history before t = 0 adds no jump) is
sampled at L = 2000 points over [0, 2] (dt = 1e-3) and streamed through memjax.hippo.project
(bilinear discretisation; LegT also with zoh). At the end (t = 2) the coefficients are turned back into the history
with memjax.hippo.reconstruct and compared with the signal at the sample midpoints, in the
measure's own norm:

- legs: uniform over the whole history [0, 2] (log-time step, the default, and the paper's
  frozen-1/t step as a second line);
- legt, lmu, fout: uniform over the window [1, 2] (theta = 1); lmu is legt in another basis, so
  their errors coincide;
- lagt: weighted by exp(-(t - s)/theta) over [0, 2] with theta = 0.25.

Writes error_vs_n.png, reconstructions.png, errors.json and README.md to --out.
"""

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from memjax import hippo

L, T, SEED = 2000, 2.0, 0
ORDERS = (4, 8, 16, 32, 64, 128, 256)
SHOWN_ORDERS = (8, 32, 128)
# name -> (measure, theta, legs_step, method)
LINES = {
    "legs": ("legs", 1.0, "log", "bilinear"),
    "legs (paper step)": ("legs", 1.0, "paper", "bilinear"),
    "legt": ("legt", 1.0, "log", "bilinear"),
    "legt (zoh)": ("legt", 1.0, "log", "zoh"),
    "lmu": ("lmu", 1.0, "log", "bilinear"),
    "lagt": ("lagt", 0.25, "log", "bilinear"),
    "fout": ("fout", 1.0, "log", "bilinear"),
}
DASHED = ("lmu", "legs (paper step)", "legt (zoh)")


def band_limited_signal(s: np.ndarray, seed: int = SEED, components: int = 12, fmax: float = 4.0):
    rng = np.random.default_rng(seed)
    freqs = rng.uniform(0.0, fmax, components)
    phases = rng.uniform(0.0, 2 * np.pi, components)
    amps = rng.normal(size=components) / np.sqrt(components)
    g = (amps[:, None] * np.sin(2 * np.pi * freqs[:, None] * s[None, :] + phases[:, None])).sum(0)
    onset = 0.5 * (1 - np.cos(np.pi * np.clip(s / 0.25, 0.0, 1.0)))
    return g * onset


def approximate(f: np.ndarray, s: np.ndarray, dt: float, line: str, n: int):
    """Final coefficients -> (times, reconstruction, weights) on the line's window."""
    measure, theta, step, method = LINES[line]
    c = hippo.project(f, measure, n, method, dt=dt, theta=theta, legs_step=step)[-1]
    if measure == "legs":  # timescale-free: time counted in samples, sample j at j + 1/2
        return s, hippo.reconstruct(c, measure, len(f), s / dt), np.ones_like(s)
    if measure == "lagt":
        return s, hippo.reconstruct(c, measure, T, s, theta=theta), np.exp(-(T - s) / theta)
    keep = s >= T - theta
    return s[keep], hippo.reconstruct(c, measure, T, s[keep], theta=theta), np.ones(keep.sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results/hippo_approx")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    dt = T / L
    s = (np.arange(L) + 0.5) * dt
    f = band_limited_signal(s)
    errors, shown = {}, {}
    for line in LINES:
        errors[line] = {}
        for n in ORDERS:
            pts, approx, w = approximate(f, s, dt, line, n)
            target = f[np.searchsorted(s, pts)]
            errors[line][n] = float(np.sqrt(np.sum(w * (approx - target) ** 2) / np.sum(w)))
            if n in SHOWN_ORDERS:
                shown[(line, n)] = (pts, approx)
    runtime = time.time() - start

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for line, errs in errors.items():
        style = "--" if line in DASHED else "-"
        ax.loglog(list(errs), list(errs.values()), style, marker="o", label=line)
    ax.set_xlabel("order N")
    ax.set_ylabel("RMSE in the measure's norm (t = 2)")
    ax.set_title(f"HiPPO online approximation, L = {L}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "error_vs_n.png", dpi=120)
    plt.close(fig)

    panels = [line for line in LINES if line not in ("lmu", "legt (zoh)")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.2 * len(panels)), sharex=True)
    for ax, line in zip(axes, panels):
        ax.plot(s, f, color="black", lw=1.5, label="signal")
        for n in SHOWN_ORDERS:
            pts, approx = shown[(line, n)]
            ax.plot(pts, approx, lw=1, label=f"N = {n}")
        ax.set_ylim(f.min() - 0.5, f.max() + 0.5)
        ax.set_title(line, fontsize=9)
    axes[0].legend(fontsize=7, ncol=4)
    axes[-1].set_xlabel("time s (reconstruction at t = 2)")
    fig.tight_layout()
    fig.savefig(out / "reconstructions.png", dpi=110)
    plt.close(fig)

    meta = dict(L=L, T=T, seed=SEED, orders=list(ORDERS),
                lines={k: dict(measure=m, theta=th, legs_step=st, method=me)
                       for k, (m, th, st, me) in LINES.items()},
                runtime_s=round(runtime, 1))
    (out / "errors.json").write_text(json.dumps({"config": meta, "rmse": errors}, indent=2) + "\n")

    header = "| measure | " + " | ".join(f"N={n}" for n in ORDERS) + " |"
    rows = [header, "|" + "---|" * (len(ORDERS) + 1)]
    rows += [f"| {line} | " + " | ".join(f"{e:.1e}" for e in errs.values()) + " |"
             for line, errs in errors.items()]
    readme = README.format(table="\n".join(rows), runtime=runtime)
    (out / "README.md").write_text(readme)
    print("\n".join(rows))
    print(f"wrote {out} in {runtime:.1f} s")


README = """# HiPPO online approximation: error vs order N

    .venv/bin/python experiments/hippo_approx.py --out docs/results/hippo_approx

(experiments/hippo_approx.py; this run took {runtime:.0f} s on a shared 2-core CPU.) A
band-limited random signal (12 sinusoids up to 4 cycles per unit time, seed 0, smooth onset)
sampled at L = 2000 points over [0, 2] is streamed through `memjax.hippo.project` with the
bilinear discretisation (and zoh for one LegT line); the final coefficients (t = 2) are
reconstructed with `memjax.hippo.reconstruct` and compared with the signal. RMSE in each measure's own norm: legs over the whole history [0, 2];
legt, lmu and fout over the window [1, 2] (theta = 1); lagt weighted by exp(-(t - s)/0.25).

{table}

![error vs N](error_vs_n.png)

![reconstructions](reconstructions.png)

Reading the table:

- LegS and LegT converge fast once N resolves the signal's bandwidth: LegS covers twice the time
  span of LegT's window with the same N, so it needs about twice the order for the same error.
- LegT's floor at large N (7e-5) is the bilinear discretisation: its eigenvalues grow with N, so
  dt |lambda| stops being small; with zoh (exact for the held input) the floor is 6e-6, about the
  size of the error of holding each sample over its dt cell. LegS's floor (4e-5 to 7e-5) is mostly
  not the discretisation: at N = 64 the exact log-time zoh step (not plotted: one matrix
  exponential per step) gives 5.7e-5 against bilinear's 7.0e-5.
- "legs (paper step)" freezes the 1/t factor at t = k + 1 (the HiPPO paper's update); the default
  "legs" steps exactly in log time (dtau = log((k+1)/k)), which removes most of the early-time
  discretisation error; with zoh the log-time step is exact for piecewise-constant input
  (tests/test_hippo.py checks this to 1e-11).
- lmu is legt in an unnormalised basis: the same approximation, the same errors.
- lagt converges slowly: the Laguerre basis must resolve oscillations inside an exponentially
  weighted past whose scale (theta = 0.25) is fixed, and its polynomials spread over [0, ~4N].
- fout does not converge: the window [1, 2] is not periodic, and FouT replaces the value leaving
  the window, f(t - 1), by its Fourier reconstruction at the window's edge, which tends to the
  average of f(t) and f(t - 1). The error this injects never decays (the normal part of FouT's
  matrix is skew-symmetric). On a window-periodic signal FouT converges
  (tests/test_hippo.py::test_fout_error_decreases_with_n_on_a_periodic_window).
"""


if __name__ == "__main__":
    main()
