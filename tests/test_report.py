"""Report helpers: the Pareto frontier, best learning rate per point, labels and length curves."""

import json

import pytest

from memjax.report import (accuracy_by_length, accuracy_slices, best_per_point, collect,
                           markdown_table, mixer_label, pareto_front, plot_accuracy_vs_length,
                           plot_accuracy_vs_state, read_csv, write_csv, write_report)


def test_pareto_front_keeps_runs_not_beaten_by_a_smaller_state():
    points = [(100, 0.5), (50, 0.6), (200, 0.55), (400, 0.9), (400, 0.8), (800, 0.9), (25, 0.1)]
    assert pareto_front(points) == [(25, 0.1), (50, 0.6), (400, 0.9)]
    assert pareto_front([]) == []


def _row(run, mixer, d, lr, state, **accuracies):
    return {"run": run, "mixer": mixer, "d_model": d, "lr": lr, "state_bytes": state,
            "accuracy": sum(accuracies.values()) / len(accuracies), **accuracies}


def test_best_per_point_picks_the_best_learning_rate():
    rows = [_row("a1", "gla", 64, 1e-3, 10, T64=0.2), _row("a2", "gla", 64, 3e-3, 10, T64=0.7),
            _row("b", "gla", 128, 1e-3, 20, T64=0.4), _row("c", "attention", 64, 1e-3, 99, T64=1.0)]
    assert [r["run"] for r in best_per_point(rows)] == ["c", "a2", "b"]


def test_best_per_point_keeps_one_run_per_task():
    """A study of two tasks (other test slices) keeps the best run of each, not of both pooled."""
    rows = [_row("mqar", "lmm", 64, 1e-2, 10, T64_K4=0.5),
            _row("passkey", "lmm", 64, 3e-3, 10, T64_d0=1.0),
            _row("mqar_lr", "lmm", 64, 3e-3, 10, T64_K4=0.7)]
    assert sorted(r["run"] for r in best_per_point(rows)) == ["mqar_lr", "passkey"]


def test_mixer_label_names_non_default_options_only():
    assert mixer_label({"name": "deltanet", "num_heads": 2, "allow_neg_eigval": False,
                        "chunk_size": 32}) == "deltanet"
    assert mixer_label({"name": "deltanet", "allow_neg_eigval": True}) == \
        "deltanet(allow_neg_eigval=True)"


def test_accuracy_by_length_averages_slices_of_one_length():
    row = _row("r", "gla", 64, 1e-3, 10, **{"T128_d0": 1.0, "T128_d1": 0.5, "T512_d0": 0.25})
    assert accuracy_slices([row]) == ["T128_d0", "T128_d1", "T512_d0"]
    assert accuracy_by_length(row) == {128: 0.75, 512: 0.25}
    tracking = _row("s", "deltanet", 64, 1e-3, 10, T64=0.9, T64_last=0.5, T256=0.7, T256_last=0.25)
    assert accuracy_by_length(tracking) == {64: 0.5, 256: 0.25}


def test_plots_and_table_are_written(tmp_path):
    rows = [_row("a", "gla", 64, 1e-3, 10, T64=0.2, T256=0.1),
            _row("b", "attention", 64, 1e-3, 99, T64=1.0, T256=0.9)]
    plot_accuracy_vs_state(rows, tmp_path / "state.png")  # two panels: T64 and T256
    assert plot_accuracy_vs_length(rows, tmp_path / "length.png")
    assert (tmp_path / "state.png").stat().st_size > 0 and (tmp_path / "length.png").stat().st_size > 0
    assert not plot_accuracy_vs_length([_row("c", "gla", 64, 1e-3, 10, T64=0.5)], tmp_path / "x.png")
    assert "| b | attention | 64 | 0.001 | 99 | 0.9500 | 1.0000 | 0.9000 |" in markdown_table(rows)


@pytest.mark.parametrize("points", [[(1, 0.5)], [(3, 0.2), (1, 0.1)]])
def test_pareto_front_is_sorted_and_monotone(points):
    front = pareto_front(points)
    assert [s for s, _ in front] == sorted(s for s, _ in front)
    assert all(a < b for (_, a), (_, b) in zip(front, front[1:]))


def _write_run(directory, result):
    directory.mkdir()
    config = {"model": {"mixer": {"name": "attention"}, "d_model": 64}, "train": {"lr": 1e-3}}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "result.json").write_text(json.dumps(
        {"step": 10, "stopped": "steps", "num_params": 1, "state_size_bytes": 8, **result}))


def test_probe_columns_follow_accuracy_and_old_results_still_render(tmp_path):
    _write_run(tmp_path / "new", {"test/T64_K4/accuracy": 0.9, "test/accuracy": 0.9,
                                  "probe/T64_K4/swapped_accuracy": 0.2,
                                  "probe/T64_K4/original_accuracy": 0.85,
                                  "probe/swapped_accuracy": 0.2, "probe/original_accuracy": 0.85})
    _write_run(tmp_path / "old", {"test/T64_K4/accuracy": 0.5, "test/accuracy": 0.5})
    new, old = collect(tmp_path)
    assert list(new)[-4:] == ["T64_K4", "accuracy", "probe_swapped", "probe_original"]
    assert (new["probe_swapped"], new["probe_original"]) == (0.2, 0.85)
    assert "probe_swapped" not in old
    assert accuracy_slices([new, old]) == ["T64_K4"]  # the probe is not a test slice
    table = markdown_table([new, old])
    assert "| accuracy | probe_swapped | probe_original |" in table
    assert "| 0.9000 | 0.9000 | 0.2000 | 0.8500 |" in table
    assert "| 0.5000 | 0.5000 | None | None |" in table


def test_csv_rows_read_back_as_written(tmp_path):
    rows = [{"run": "a", "mixer": "mom(num_memories=2)", "d_model": 128, "lr": 0.01,
             "params": 272016, "state_bytes": 146436, "steps": 1000, "stopped": "steps",
             "wall_s": None, "T64_K4": 0.99775, "accuracy": 0.9821041666666667},
            {"run": "b", "mixer": "gated_deltanet", "d_model": 64, "lr": 0.003, "params": 1,
             "state_bytes": 8, "steps": 450, "stopped": "target_accuracy", "wall_s": 112,
             "T64_d0": 1.0, "accuracy": 0.5}]
    write_csv(rows, tmp_path / "report.csv")
    assert read_csv(tmp_path / "report.csv") == rows  # b has no T64_K4, a no T64_d0


def test_report_keeps_earlier_rows_of_runs_not_in_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    _write_run(sweep / "kept_fresh", {"test/accuracy": 0.9})
    earlier = [{"run": "gone", "mixer": "gla", "d_model": 64, "lr": 0.01, "params": 3,
                "state_bytes": 5, "steps": 7, "stopped": "steps", "wall_s": 11, "accuracy": 0.25},
               {"run": "kept_fresh", "mixer": "stale", "d_model": 64, "lr": 0.01, "params": 3,
                "state_bytes": 5, "steps": 7, "stopped": "steps", "wall_s": 11, "accuracy": 0.1}]
    write_csv(earlier, tmp_path / "earlier.csv")
    rows = write_report(sweep, tmp_path / "out", earlier=tmp_path / "earlier.csv")
    assert [(r["run"], r["mixer"], r["accuracy"]) for r in rows] == [
        ("gone", "gla", 0.25), ("kept_fresh", "attention", 0.9)]
    assert [r["run"] for r in read_csv(tmp_path / "out" / "report.csv")] == ["gone", "kept_fresh"]
