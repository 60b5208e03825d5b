"""Sweep reports: one row per finished run (config, size, state size, per-slice accuracy, time),
written as a Markdown table, a CSV and an accuracy-vs-state-size plot."""

import csv
import json
from pathlib import Path


def collect(sweep_dir) -> list[dict]:
    """Rows of the runs under `sweep_dir` that have a `result.json`, sorted by name."""
    rows = []
    for result_path in sorted(Path(sweep_dir).glob("*/result.json")):
        run_dir = result_path.parent
        result = json.loads(result_path.read_text())
        config = json.loads((run_dir / "config.json").read_text())
        info_path = run_dir / "sweep_run.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        row = {"run": run_dir.name, "mixer": config["model"]["mixer"]["name"],
               "d_model": config["model"]["d_model"], "lr": config["train"]["lr"],
               "params": result["num_params"], "state_bytes": result["state_size_bytes"],
               "steps": result["step"], "stopped": result["stopped"],
               "wall_s": round(info["wall_s"]) if "wall_s" in info else None}
        row |= {k.removeprefix("test/").removesuffix("/accuracy"): v
                for k, v in result.items() if k.startswith("test/")}
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no finished runs)\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.4f}" if isinstance(row[c], float) and c not in ("lr",) else str(row[c])
                 for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["run"])
        writer.writeheader()
        writer.writerows(rows)


def plot_accuracy_vs_state(rows: list[dict], path, metric: str = "accuracy"):
    """Scatter of `metric` against state bytes (log x), one colour per mixer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mixer in sorted({r["mixer"] for r in rows}):
        points = [(r["state_bytes"], r[metric]) for r in rows if r["mixer"] == mixer]
        ax.scatter(*zip(*points), label=mixer)
    ax.set_xscale("log")
    ax.set_xlabel("state size (bytes)")
    ax.set_ylabel(f"test {metric}")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(sweep_dir, out_dir=None) -> list[dict]:
    """Writes `report.md`, `report.csv` and `accuracy_vs_state.png` into `out_dir` (default:
    the sweep directory) and returns the rows."""
    out_dir = Path(out_dir or sweep_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = collect(sweep_dir)
    (out_dir / "report.md").write_text(markdown_table(rows))
    write_csv(rows, out_dir / "report.csv")
    if rows:
        plot_accuracy_vs_state(rows, out_dir / "accuracy_vs_state.png")
    return rows
