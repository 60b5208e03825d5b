"""In-context linear regression with a drifting target (a memory as an online regressor).

Each sequence has its own hidden weight vector, which performs a random walk; the model sees
inputs ``x_t`` and, one step late, the targets ``y_t``, and must predict ``y_t`` from ``x_t`` and
everything before. Its squared error by position shows how fast it adapts (the first ``d`` or so
positions, where ``w`` is still underdetermined) and whether it keeps tracking ``w`` as it drifts
(later positions): a memory that never forgets converges to a stale ``w``.

Construction of one example (input dimension d, length T, drift scale ``drift``, observation noise
``noise``), all draws from ``rng = data.example_rng(seed, index)`` in this order, in float64:

1. ``w0 = rng.standard_normal(d) / sqrt(d)``: ``w_0 ~ N(0, I/d)``, so ``<w_0, x>`` has variance 1.
2. ``steps = rng.standard_normal((T - 1, d)) / sqrt(d)``; ``w_t = w_{t-1} + drift * steps[t-1]``
   for ``t = 1 .. T-1`` (a Gaussian random walk, ``E|w_t|^2 = 1 + t * drift^2``). ``drift = 0``
   gives a constant ``w``. The steps are drawn whatever ``drift`` is, so slices that differ only
   in drift (and noise) share their ``x`` and ``w_0`` example by example.
3. ``x = rng.standard_normal((T, d))``: ``x_t ~ N(0, I_d)``.
4. ``eta = rng.standard_normal(T)``; ``y_t = <w_t, x_t> + noise * eta_t``.

Returned (float32): ``inputs[T, d + 1]`` with ``inputs[t] = [x_t, y_{t-1}]`` (``y_{-1} = 0``: the
previous target as feedback) and ``targets[T, 1]`` with ``targets[t] = y_t``; every position is
supervised (no ``mask``), and the trainer scores mean squared error per position
(``test/<slice>/mse_by_position``). ``return_weights=True`` adds ``weights[T, d] = w_t``.

``optimal_mse`` gives the Bayes-optimal predictor's error on the same examples (a Kalman filter,
exact for this linear-Gaussian model): the floor any model's curve can reach.

Public API: ``RegressionSlice``, ``make_examples``, ``make_example``, ``optimal_mse`` and the
builder registered as task ``"drifting_regression"``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from memjax.tasks import data
from memjax.tasks.registry import TASKS, TaskData, parse_settings

__all__ = ["RegressionSlice", "check_dim", "make_example", "make_examples", "optimal_mse"]


def _check_scale(name: str, value) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a finite number >= 0, got {name}={value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number >= 0, got {name}={value!r}") from None
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {name}={value!r}")
    return number


def check_dim(dim) -> int:
    """``dim`` as an int >= 1, else a ValueError naming it."""
    dim = data.as_int("dim", dim)
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got dim={dim}")
    return dim


@dataclasses.dataclass(frozen=True)
class RegressionSlice:
    """One block of examples: ``(seq_len, drift, noise, num_examples)``.

    Attributes:
      seq_len: T, positions per sequence (>= 1).
      drift: standard deviation of each random-walk step of ``w``, in units of ``w_0``'s per
        coordinate scale ``1/sqrt(d)`` (>= 0; 0 = stationary).
      noise: standard deviation of the observation noise on ``y`` (>= 0).
      num_examples: examples in the slice (>= 1).
    """

    seq_len: int
    drift: float
    noise: float
    num_examples: int

    def __post_init__(self):
        for field in ("seq_len", "num_examples"):
            value = data.as_int(field, getattr(self, field))
            if value < 1:
                raise ValueError(f"{field} must be >= 1, got {field}={value}")
            object.__setattr__(self, field, value)
        for field in ("drift", "noise"):
            object.__setattr__(self, field, _check_scale(field, getattr(self, field)))

    @property
    def name(self) -> str:
        """Slice name for metrics, e.g. ``"T64_drift0.05_noise0.1"``."""
        return f"T{self.seq_len}_drift{self.drift:g}_noise{self.noise:g}"


def _draw(rng: np.random.Generator, dim: int, seq_len: int):
    """All random draws of one example, in the documented order."""
    w0 = rng.standard_normal(dim) / math.sqrt(dim)
    steps = rng.standard_normal((seq_len - 1, dim)) / math.sqrt(dim)
    x = rng.standard_normal((seq_len, dim))
    eta = rng.standard_normal(seq_len)
    return w0, steps, x, eta


def make_examples(dim: int, settings: RegressionSlice, seed: int, indices, *,
                  return_weights: bool = False) -> dict[str, np.ndarray]:
    """A batch: row ``b`` is example ``indices[b]`` (see the module docstring).

    Returns ``{"inputs": float32[N, T, d+1], "targets": float32[N, T, 1]}`` (plus
    ``"weights": float32[N, T, d]`` with ``return_weights``).
    """
    dim = check_dim(dim)
    seed = data.check_seed("seed", seed)
    indices = data.check_indices(np.atleast_1d(indices))
    n, seq_len = len(indices), settings.seq_len
    w0 = np.empty((n, dim))
    steps = np.empty((n, seq_len - 1, dim))
    x = np.empty((n, seq_len, dim))
    eta = np.empty((n, seq_len))
    for row, index in enumerate(indices.tolist()):
        w0[row], steps[row], x[row], eta[row] = _draw(data.example_rng(seed, index), dim, seq_len)
    walk = np.concatenate([np.zeros((n, 1, dim)), np.cumsum(steps, axis=1)], axis=1)
    weights = w0[:, None, :] + settings.drift * walk  # w_t, [N, T, d]
    y = np.einsum("ntd,ntd->nt", weights, x) + settings.noise * eta
    feedback = np.concatenate([np.zeros((n, 1)), y[:, :-1]], axis=1)  # y_{t-1}, 0 at t = 0
    batch = {"inputs": np.concatenate([x, feedback[..., None]], axis=-1).astype(np.float32),
             "targets": y[..., None].astype(np.float32)}
    if return_weights:
        batch["weights"] = weights.astype(np.float32)
    return batch


def make_example(dim: int, settings: RegressionSlice, seed: int, index: int, *,
                 return_weights: bool = False) -> dict[str, np.ndarray]:
    """One example, a pure function of ``(seed, index)``: ``inputs[T, d+1]``, ``targets[T, 1]``."""
    index = data.as_int("index", index)
    batch = make_examples(dim, settings, seed, [index], return_weights=return_weights)
    return {k: v[0] for k, v in batch.items()}


def optimal_mse(dim: int, settings: RegressionSlice, seed: int, indices) -> np.ndarray:
    """Squared error of the Bayes-optimal prediction of each ``y_t``: float64 ``[N, T]``.

    A Kalman filter over ``w`` with the true prior (``N(0, I/d)``), random-walk covariance
    (``drift^2 / d`` per coordinate per step) and noise variance (``noise^2``), fed the same
    ``x_t`` and past ``y`` as the model; its prediction of ``y_t`` is the posterior mean of
    ``<w_t, x_t>``, which minimises the expected squared error. The mean over examples is the
    curve to compare with ``test/<slice>/mse_by_position``. The filter's noise variance has a
    ``1e-10`` floor: with ``noise = 0`` the float32 rounding of the targets is the only noise, and
    a zero variance would make the update divide by (numerically) zero.
    """
    dim = check_dim(dim)
    batch = make_examples(dim, settings, seed, indices)
    x = batch["inputs"][..., :dim].astype(np.float64)
    y = batch["targets"][..., 0].astype(np.float64)
    n, seq_len = y.shape
    mean = np.zeros((n, dim))
    cov = np.broadcast_to(np.eye(dim) / dim, (n, dim, dim)).copy()
    errors = np.empty((n, seq_len))
    for t in range(seq_len):
        if t:
            cov += (settings.drift**2 / dim) * np.eye(dim)
        xt = x[:, t]
        errors[:, t] = (y[:, t] - np.einsum("nd,nd->n", mean, xt)) ** 2
        cov_x = np.einsum("nij,nj->ni", cov, xt)
        variance = np.einsum("ni,ni->n", xt, cov_x) + max(settings.noise**2, 1e-10)
        gain = cov_x / variance[:, None]
        mean += gain * (y[:, t] - np.einsum("nd,nd->n", mean, xt))[:, None]
        cov -= gain[:, :, None] * cov_x[:, None, :]
        cov = 0.5 * (cov + cov.transpose(0, 2, 1))  # keep it symmetric against rounding
    return errors


def _slice(dim: int, settings: RegressionSlice) -> data.Slice:
    return data.Slice(settings.name, settings.num_examples,
                      functools.partial(_batch, dim, settings))


def _batch(dim, settings, seed, indices):
    return make_examples(dim, settings, seed, indices)


def _parse_slice(entry: tuple) -> RegressionSlice:
    if len(entry) != 4:
        raise ValueError("expected (seq_len, drift, noise, num_examples)")
    return RegressionSlice(*entry)


@TASKS.register("drifting_regression")
def build(cfg, seed: int) -> TaskData:
    """Drifting in-context regression from `config.task`: `dim` (d), `train_slices` and
    `test_slices` (tuples `(seq_len, drift, noise, num_examples)`), `batch_size`,
    `eval_batch_size`. Inputs are float `[B, T, d+1]`, targets `[B, T, 1]`, loss `"mse"`."""
    try:
        dim = check_dim(cfg.dim)
    except ValueError as error:
        raise ValueError(f"task.dim = {cfg.dim!r}: {error}") from None
    train = parse_settings(cfg, "train_slices", _parse_slice)
    test = parse_settings(cfg, "test_slices", _parse_slice)
    return TaskData(
        train=data.train_dataset([_slice(dim, s) for s in train], cfg.batch_size, seed),
        test=data.test_datasets([_slice(dim, s) for s in test], cfg.eval_batch_size, seed),
        sample_length=max(s.seq_len for s in train),
        input_dim=dim + 1,
        output_dim=1,
        loss="mse",
    )
