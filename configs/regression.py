"""In-context linear regression with a drifting target (`memjax.tasks.regression`).

Each sequence draws `w_0 ~ N(0, I/d)`, lets it drift as a random walk (step std `drift/sqrt(d)`
per coordinate), and shows `[x_t, y_{t-1}]` at position t; the model predicts
`y_t = <w_t, x_t> + noise`. Loss and score: mean squared error at every position; the test curve
`test/<slice>/mse_by_position` (in `result.json`) shows how fast the model adapts and whether it
keeps up with the drift. `memjax.tasks.regression.optimal_mse` gives the Bayes-optimal curve.

    python scripts/train.py --config configs/regression.py:model=deltanet,drift=0.1 \
        --workdir runs/regression_drift

Measured on the 2-core CPU (shared), DeltaNet, d_model 64, d = 8, T = 64, noise 0.1, 1500 steps
(`--config.train.steps=1500`, about 6 min each); MSE over positions 0-15 / 48-63 (the Kalman
optimum from `optimal_mse` on the same test examples in brackets):
  trained and tested without drift:       0.518 / 0.030  (0.321 / 0.012)
  trained and tested with drift=0.1:      0.569 / 0.133  (0.374 / 0.084)
  trained with drift=0.1, tested without: 0.525 / 0.034  (0.322 / 0.012)

Arguments after `:` (comma-separated): `model=<mixer>`, `d_model=<int>`, `dim=<int>` (d),
`T=<int>`, `drift=<float>` (0 = stationary), `noise=<float>`, `smoke` (a tiny run for tests).
The test slices are the trained setting and, when `drift > 0`, the same setting without drift.
Training always runs `train.steps` steps (early stopping on accuracy does not apply to MSE).
"""

import ml_collections

from memjax.config import lm_config, make_smoke, mesh_config, parse_arg, train_config


def get_config(arg=None):
    arg = parse_arg(arg, model="deltanet", d_model=64, dim=8, T=64, drift=0.0, noise=0.1,
                    smoke=False)
    drift, noise = float(arg["drift"]), float(arg["noise"])
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.task = ml_collections.ConfigDict()
    config.task.name = "drifting_regression"
    dim = ml_collections.FieldReference(arg["dim"])  # shared: the model's input width follows it
    config.task.dim = dim
    # (seq_len, drift, noise, num_examples) per slice.
    config.task.train_slices = ((arg["T"], drift, noise, 200_000),)
    test = [(arg["T"], drift, noise, 1_000)]
    if drift:
        test.append((arg["T"], 0.0, noise, 1_000))
    config.task.test_slices = tuple(test)
    config.task.batch_size = 64
    config.task.eval_batch_size = 250

    # Float inputs [x_t, y_{t-1}] through a Dense projection; a width-1 regression head.
    config.model = lm_config(0, arg["d_model"], arg["model"])
    config.model.input_dim = dim + 1
    config.model.output_dim = 1
    config.train = train_config(steps=3_000, lr=3e-3)
    config.train.target_accuracy = 0.0  # not used for regression; set to 0 to say so
    config.mesh = mesh_config()

    if arg["smoke"]:
        dim.set(4)
        config.task.train_slices = ((16, 0.1, 0.1, 512),)
        config.task.test_slices = ((16, 0.1, 0.1, 64), (16, 0.0, 0.1, 64))
        config.task.batch_size = 16
        config.task.eval_batch_size = 32
        make_smoke(config)
        config.train.lr = 1e-2
    return config
