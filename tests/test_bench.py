"""scripts/bench.py runs end to end at tiny sizes and writes the documented JSON fields."""

import importlib.util
import json

import pytest


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", "scripts/bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_writes_json(tmp_path):
    bench = load_bench()
    out = tmp_path / "bench.json"
    bench.main(["--ops", "linear_attention", "--T", "40", "--H", "1", "--K", "8", "--V", "8",
                "--chunk-size", "16", "--repeats", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["matmul"]["gflops"] > 0
    rows = report["results"]
    assert {(r["impl"], r["mode"]) for r in rows} == {
        ("reference", "fwd"), ("chunk", "fwd"), ("reference", "fwdbwd"), ("chunk", "fwdbwd")}
    for r in rows:
        assert r["median_s"] > 0 and r["compile_s"] > 0 and r["tokens_per_s"] == pytest.approx(40 / r["median_s"])
        assert r["matmul_ratio"] == pytest.approx(r["gflops"] / report["matmul"]["gflops"])


def test_bench_skips_forms_over_the_memory_limit(tmp_path):
    bench = load_bench()
    out = tmp_path / "bench.json"
    bench.main(["--ops", "linear_attention", "--impls", "reference", "--modes", "fwdbwd", "--T", "64",
                "--H", "1", "--K", "8", "--V", "8", "--repeats", "1", "--memory-limit-gb", "0",
                "--out", str(out)])
    (row,) = json.loads(out.read_text())["results"]
    assert "skipped" in row and "median_s" not in row


def test_bench_rejects_unknown_ops():
    with pytest.raises(SystemExit):
        load_bench().parse_args(["--ops", "nope"])


def test_bench_runs_every_form_of_the_state_space_scans(tmp_path):
    bench = load_bench()
    out = tmp_path / "bench.json"
    bench.main(["--ops", "s4d,ssd", "--modes", "fwd", "--T", "20", "--D", "4", "--N", "2", "--H", "2",
                "--chunk-size", "8", "--repeats", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [(r["op"], r["impl"]) for r in rows] == [
        ("s4d", "reference"), ("s4d", "scan"), ("s4d", "conv"), ("ssd", "reference"), ("ssd", "chunk")]
    assert all(r["median_s"] > 0 and (r["D"], r["N"]) == (4, 2) for r in rows)


def test_bench_impls_filter_keeps_only_forms_an_op_has():
    bench = load_bench()
    assert bench._forms(bench.CASES["ssd"], "associative,chunk") == ("chunk",)
    assert bench._forms(bench.CASES["linear_scan"], "all") == ("reference", "associative", "chunk")
