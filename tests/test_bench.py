"""scripts/bench.py runs end to end at tiny sizes and writes the documented JSON fields."""

import importlib.util
import json

import pytest


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", "scripts/bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
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
    assert bench._forms(bench.CASES["ssd"], "scan,chunk") == ("chunk",)
    assert bench._forms(bench.CASES["linear_scan"], "all") == ("reference", "scan", "chunk")
    # pallas only where asked for and a kernel is registered (on CPU: the interpreted kernels)
    assert bench._forms(bench.CASES["gated_delta_rule"], "chunk,pallas") == ("chunk", "pallas")
    assert bench._forms(bench.CASES["gated_delta_rule"], "all") == ("reference", "chunk")
    assert bench._forms(bench.CASES["s5"], "chunk,pallas") == ("chunk",)


@pytest.mark.integration
def test_bench_models_times_a_train_step_beside_attention(tmp_path):
    # One layer and the two mixers quickest to compile: the cost is XLA compiling three steps.
    bench = load_bench()
    out = tmp_path / "bench.json"
    bench.main(["--models", "linear_attention,s4d", "--d_model", "16", "--T", "32", "--batch", "2",
                "--vocab", "64", "--num_layers", "1", "--repeats", "2", "--warmup", "0", "--out", str(out)])
    report = json.loads(out.read_text())
    rows = report["results"]
    assert [r["mixer"] for r in rows] == ["attention", "linear_attention", "s4d"]  # baseline first
    attention = rows[0]["median_s"]
    for r in rows:
        assert (r["d_model"], r["T"], r["batch"], r["vocab"], r["num_layers"]) == (16, 32, 2, 64, 1)
        assert r["supervised_per_row"] == 2 and r["num_params"] > 0  # T / 16 labelled positions
        assert r["median_s"] > 0 and r["compile_s"] > 0 and len(r["times_s"]) == 2
        assert r["tokens_per_s"] == pytest.approx(2 * 32 / r["median_s"])
        assert r["vs_attention"] == pytest.approx(r["median_s"] / attention)
    assert rows[0]["vs_attention"] == 1.0


def test_bench_models_shapes_and_names():
    bench = load_bench()
    args = bench.parse_args(["--models", "all", "--shapes", "128x256x64,64x1024x128"])
    assert bench.model_shapes(args) == [(128, 256, 64), (64, 1024, 128)]
    args = bench.parse_args(["--models", "gla", "--d_model", "64,128", "--batch", "8"])
    assert bench.model_shapes(args) == [(d, T, 8) for d in (64, 128) for T in (64, 256, 1024)]
    with pytest.raises(SystemExit):
        bench.run_models(bench.parse_args(["--models", "nope"]))


def test_mixer_specs_carry_options_and_mom_pairs_each_mixture_with_its_state_match():
    bench = load_bench()
    assert bench.parse_mixer_spec("mom:num_memories=4:top_k=2:memory=gla") == (
        "mom", {"num_memories": 4, "top_k": 2, "memory": "gla"})
    assert bench.parse_mixer_spec("gla") == ("gla", {})
    with pytest.raises(SystemExit, match="not key=value"):
        bench.parse_mixer_spec("mom:num_memories")
    specs = bench.mom_mixers(64)
    assert "mom:num_memories=8:top_k=2" in specs
    assert "gated_deltanet:num_heads=16:head_size=32" in specs  # 8 memories x 2 heads of 32
    with pytest.raises(SystemExit, match="unknown option"):
        bench.model_step("mom:nope=1", 16, 32, 2, bench.parse_args(["--models", "mom"]))


def test_synthetic_batch_labels_a_sixteenth_of_each_row():
    bench = load_bench()
    batch = bench.synthetic_batch(vocab=50, T=64, batch=3)
    assert batch["positions"].shape == (3, 4) and batch["mask"].all()
    assert batch["inputs"].shape == (3, 64) and batch["inputs"].max() < 50
