"""Sweep reports: one row per finished run, as a Markdown table, a CSV and PNG plots.

A row holds the run's mixer (with its non-default options), d_model, learning rate, parameter
count, recurrent state size, steps, wall time and every scalar test metric: the accuracy of each
test slice as a column named after the slice (`T256_K16`), the pooled accuracy as `accuracy`,
and regression errors as `<slice> mse`. Runs with MQAR's key-swap recall probe also get, right
after `accuracy`, `probe_swapped` and `probe_original` (pooled accuracy against the swapped-in
key's value and against the original value): recall shows as `probe_swapped` ~ `accuracy`, a
learnt prior as `probe_original` ~ `accuracy` with `probe_swapped` near chance.

Plots:
- `accuracy_vs_state.png`: test accuracy against state size, one panel per test slice, one
  colour per mixer, the best learning rate per (mixer, d_model, task), and the Pareto frontier
  (the most accurate run at or below each state size) drawn as a dashed line.
- `accuracy_vs_length.png` (when test slices span several lengths `T<n>...`): accuracy against
  test length, one line per run, slices of the same length averaged (e.g. over needle depths);
  final-position slices `T<n>_last` only, when a run has them.

`write_report(..., earlier=path)` keeps the rows of an earlier `report.csv` whose runs are not in
the sweep directory (runs made in another session, whose directories are gone), so a study
finished in parts still gets one report.

The sweep directory and the output directory may be remote (`gs://bucket/sweep`,
`memjax.paths`).
"""

import csv
import io
import json
import re

from memjax.paths import as_path

# Mixer options that choose an implementation, not a model; left out of the mixer label.
_IMPLEMENTATION_OPTIONS = {"impl", "chunk_size"}
_LENGTH = re.compile(r"^T(\d+)")
# Columns of a row that hold whole numbers (the rest are text or float metrics).
_INT_COLUMNS = {"d_model", "params", "state_bytes", "steps", "wall_s"}


def mixer_label(mixer: dict) -> str:
    """`name` plus the options that differ from the mixer's defaults, e.g.
    `deltanet(allow_neg_eigval=True)`."""
    from memjax.layers import mixer_options

    defaults = mixer_options(mixer["name"])
    changed = [f"{k}={v}" for k, v in mixer.items()
               if k != "name" and k not in _IMPLEMENTATION_OPTIONS and defaults.get(k) != v]
    return mixer["name"] + (f"({', '.join(changed)})" if changed else "")


def model_label(model: dict) -> str:
    """The mixer label, or for a per-layer pattern its kinds' labels joined by "+"."""
    if not model.get("layers"):
        return mixer_label(model["mixer"])
    from memjax.models.lm import layer_kinds

    return "+".join(mixer_label(model["mixers"][kind]) for kind in layer_kinds(model["layers"]))


# Pooled key-swap recall probe metrics (MQAR) -> their columns, placed right after `accuracy`.
PROBE_COLUMNS = {"probe/swapped_accuracy": "probe_swapped",
                 "probe/original_accuracy": "probe_original"}


def _metric_columns(result: dict) -> dict:
    columns = {}
    for key, value in result.items():
        if not key.startswith("test/") or not isinstance(value, (int, float)):
            continue  # lists such as per-position error curves stay in result.json
        name = key.removeprefix("test/")
        if name.endswith("/accuracy"):
            columns[name.removesuffix("/accuracy")] = value
        elif "/" in name:
            columns[name.replace("/", " ")] = value
        else:
            columns[name] = value
    return _with_probe(columns, result)


def _with_probe(columns: dict, result: dict) -> dict:
    """`columns` with the pooled probe columns inserted after `accuracy`, when `result` has them.

    Per-segment probe metrics stay in result.json; results without a probe (older runs, other
    tasks) get no probe columns.
    """
    probe = {name: result[key] for key, name in PROBE_COLUMNS.items() if key in result}
    if not probe:
        return columns
    out = {}
    for name, value in columns.items():
        out[name] = value
        if name == "accuracy":
            out |= probe
    return out | probe  # no pooled accuracy column: the probe goes last


def collect(sweep_dir) -> list[dict]:
    """Rows of the runs under `sweep_dir` that have a `result.json`, sorted by name."""
    rows = []
    for result_path in sorted(as_path(sweep_dir).glob("*/result.json")):
        run_dir = result_path.parent
        result = json.loads(result_path.read_text())
        config = json.loads((run_dir / "config.json").read_text())
        info_path = run_dir / "sweep_run.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        row = {"run": run_dir.name, "mixer": model_label(config["model"]),
               "d_model": config["model"]["d_model"], "lr": config["train"]["lr"],
               "params": result["num_params"], "state_bytes": result["state_size_bytes"],
               "steps": result["step"], "stopped": result["stopped"],
               "wall_s": round(info["wall_s"]) if "wall_s" in info else None}
        rows.append(row | _metric_columns(result))
    return rows


def read_csv(path) -> list[dict]:
    """The rows of a `report.csv` (`write_csv`), with numbers as numbers: an empty cell is a
    metric the run does not have (left out of its row), or an unknown wall time (None)."""
    rows = []
    for record in csv.DictReader(io.StringIO(as_path(path).read_text(), newline="")):
        row = {}
        for key, text in record.items():
            if text == "":
                if key == "wall_s":
                    row[key] = None
                continue
            if key in _INT_COLUMNS:
                row[key] = int(text)
            else:
                try:
                    row[key] = float(text)
                except ValueError:
                    row[key] = text
        for key in ("accuracy", *PROBE_COLUMNS.values()):  # after the slices, as `collect`
            if key in row:
                row[key] = row.pop(key)
        rows.append(row)
    return rows


def accuracy_slices(rows: list[dict]) -> list[str]:
    """Names of the per-slice accuracy columns, in the order of the first row that has them."""
    fixed = {"run", "mixer", "d_model", "lr", "params", "state_bytes", "steps", "stopped",
             "wall_s", "accuracy", *PROBE_COLUMNS.values()}
    names = []
    for row in rows:
        for key, value in row.items():
            if key not in fixed and " " not in key and isinstance(value, float) and key not in names:
                names.append(key)
    return names


def best_per_point(rows: list[dict], metric: str = "accuracy") -> list[dict]:
    """The run with the highest `metric` for each (mixer, d_model) and set of test slices: the
    best learning rate. Runs tested on different slices answer different tasks (a study of
    MQAR and passkey), so each keeps its own best."""
    best = {}
    for row in rows:
        key = (row["mixer"], row["d_model"], tuple(accuracy_slices([row])))
        if row.get(metric) is None:
            continue
        if key not in best or row[metric] > best[key][metric]:
            best[key] = row
    return sorted(best.values(), key=lambda r: (r["mixer"], r["d_model"]))


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points `(state, accuracy)` not beaten by one with no more state and higher accuracy,
    sorted by state."""
    front, best = [], float("-inf")
    for state, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if accuracy > best:
            front.append((state, accuracy))
            best = accuracy
    return front


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no finished runs)\n"
    columns = list(dict.fromkeys(c for row in rows for c in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            cells.append(f"{value:.4f}" if isinstance(value, float) and c != "lr" else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path):
    columns = list(dict.fromkeys(c for row in rows for c in row)) or ["run"]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    as_path(path).write_bytes(text.getvalue().encode())  # the CSV's own line ends (\r\n)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_state(rows: list[dict], path):
    """One panel per test slice: accuracy vs state bytes (log x), Pareto frontier dashed."""
    plt = _pyplot()
    slices = accuracy_slices(rows) or ["accuracy"]
    mixers = sorted({r["mixer"] for r in rows})
    palette = plt.get_cmap("tab10" if len(mixers) <= 10 else "tab20")
    colours = {m: palette(i % palette.N) for i, m in enumerate(mixers)}
    cols = min(len(slices), 4)
    nrows = -(-len(slices) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.3 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, slices):
        points = [(r["state_bytes"], r[name]) for r in rows if r.get(name) is not None]
        for mixer in mixers:
            mine = [(r["state_bytes"], r[name]) for r in rows
                    if r["mixer"] == mixer and r.get(name) is not None]
            if mine:
                ax.scatter(*zip(*mine), color=colours[mixer], label=mixer, s=25, zorder=3)
        front = pareto_front(points)
        if len(front) > 1:
            ax.step(*zip(*front), where="post", color="black", ls="--", lw=1, zorder=2,
                    label="Pareto frontier")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # labelled minor ticks overlap
        ax.set_title(name, fontsize="medium")
        ax.set_xlabel("state size (bytes)")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(slices):]:
        ax.axis("off")
    legend = {}  # label -> handle, from every panel: a study mixing tasks has no panel with all
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    labels = sorted(legend, key=lambda label: label == "Pareto frontier")
    handles = [legend[label] for label in labels]
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize="small",
               bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.1 if nrows == 1 else 0.06, 1, 1))
    _save(fig, path)


def accuracy_by_length(row: dict) -> dict[int, float]:
    """`{length: mean accuracy over the row's slices named T<length>...}`.

    When the row has final-position slices (`T<length>_last`, the state-tracking tasks), only
    those count: accuracy averaged over every position of a long sequence mixes in its short,
    in-distribution prefixes.
    """
    names = [n for n in accuracy_slices([row]) if _LENGTH.match(n)]
    if any(n.endswith("_last") for n in names):
        names = [n for n in names if n.endswith("_last")]
    by_length: dict[int, list[float]] = {}
    for name in names:
        by_length.setdefault(int(_LENGTH.match(name).group(1)), []).append(row[name])
    return {n: sum(v) / len(v) for n, v in sorted(by_length.items())}


def plot_accuracy_vs_length(rows: list[dict], path) -> bool:
    """Accuracy vs test length, one line per run tested at two lengths or more (a study that
    mixes tasks plots only those runs), each in its own colour; returns False (no file) when no
    run has two lengths."""
    curves = {r["run"]: accuracy_by_length(r) for r in rows}
    plotted = [r for r in rows if len(curves[r["run"]]) >= 2]
    if not plotted:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    colours = plt.get_cmap("tab20").colors
    for i, row in enumerate(plotted):
        curve = curves[row["run"]]
        ax.plot(list(curve), list(curve.values()), marker="o", color=colours[i % len(colours)],
                label=f"{row['mixer']} d{row['d_model']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("test length")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    _save(fig, path)
    return True


def _save(fig, path):
    """Saves a figure as PNG to `path` (local or remote) and closes it. The image grows to hold
    what lies outside the axes (a legend beside them), which the figure size alone would cut."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    as_path(path).write_bytes(buffer.getvalue())


def write_report(sweep_dir, out_dir=None, earlier=None) -> list[dict]:
    """Writes `report.md` (best learning rate per (mixer, d_model), then every run),
    `report.csv` (every run) and the plots into `out_dir` (default: the sweep directory);
    returns the rows of every run. `earlier`: a `report.csv` whose rows are kept for the runs
    the sweep directory does not hold (a run in both is taken from the sweep directory)."""
    out_dir = as_path(out_dir or sweep_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = collect(sweep_dir)
    if earlier is not None:
        fresh = {row["run"] for row in rows}
        rows = sorted(rows + [row for row in read_csv(earlier) if row["run"] not in fresh],
                      key=lambda row: row["run"])
    best = best_per_point(rows)
    text = "## Best learning rate per (mixer, d_model)\n\n" + markdown_table(best)
    text += "\n## Every run\n\n" + markdown_table(rows)
    (out_dir / "report.md").write_text(text)
    write_csv(rows, out_dir / "report.csv")
    if best:
        plot_accuracy_vs_state(best, out_dir / "accuracy_vs_state.png")
        plot_accuracy_vs_length(rows, out_dir / "accuracy_vs_length.png")
    return rows
