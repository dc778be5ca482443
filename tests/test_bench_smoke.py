"""`make bench --quick` at tiny sizes: every row produces a number or a stated failure, and the results
JSON carries the fields SPEC §6 and the benchmark issue name. (Speed is never asserted here.)"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"device", "torch", "date", "importance_vs_plain", "importance_speedup_vs_fastest_peer",
        "adam_step_bandwidth_fraction", "adam_step_speedup_vs_reference", "adam_step_vs_torch_fused", "rows"}
METHODS = {"plain", "batch_abs", "reference", "fused", "loop", "vmap", "opacus", "backpack"}


def test_quick_bench_rows_all_answer(tmp_path):
    run = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--quick", "--device", "cpu", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    (found,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    result = json.load(open(tmp_path / found))
    assert KEYS <= set(result), sorted(KEYS - set(result))
    assert result["device"] == "cpu" and result["torch"] == __import__("torch").__version__
    models = {r["model"] for r in result["rows"]}
    assert models == {"mlp", "cnn", "resnet18", "transformer", "llama", "gpt2", "bert"}
    for model in models:
        assert {r["method"] for r in result["rows"] if r["model"] == model} == METHODS, model
    for r in result["rows"]:
        if r["status"] == "ok":
            assert r["time_s"] > 0, r
        else:  # a failure is reported with its reason, never dropped
            assert r["reason"], r
    for r in result["rows"]:
        if r["method"] in ("reference", "fused", "loop", "vmap") and r["status"] == "ok":
            assert r["rel_err"] < 1e-4, r  # the exact methods agree with the per-sample definition
    for key in ("importance_vs_plain", "importance_speedup_vs_fastest_peer"):
        assert set(result[key]) == models, key
        # a ratio is a number where both rows ran, else None (the rows say why)
        assert all(v is None or v > 0 for v in result[key].values()), result[key]
    for model, v in result["importance_vs_plain"].items():
        fused = next(r for r in result["rows"] if r["model"] == model and r["method"] == "fused")
        assert (v is not None) == (fused["status"] == "ok"), (model, fused)
    for key in ("adam_step_bandwidth_fraction", "adam_step_speedup_vs_reference", "adam_step_vs_torch_fused"):
        assert result[key] is None or result[key] > 0, key
    assert result["notes"] and all(m.get("reference") for m in result["models"].values())
    assert (tmp_path / found.replace(".json", ".md")).exists()


def test_rows_grouped_per_model_survive_a_crashed_row(tmp_path, monkeypatch):
    """CUDA's grouping (one worker process per model): a row that takes its process down is reported with its
    reason, and the rows after it run in a fresh process."""
    sys.path.insert(0, ROOT)
    from benchmarks import bench

    launches = []

    def fake_launch(specs, tmp, timeout):  # the worker: writes each row's record when it starts, then its result
        for spec in specs:
            spec["out"] = os.path.join(tmp, f"result-{spec['model']}-{spec['method']}.json")
        launches.append([s["method"] for s in specs])
        for spec in specs:
            row = {"model": spec["model"], "method": spec["method"], "status": "error", "reason": None}
            if spec["method"] == "crash" and len(launches) == 1:
                json.dump(row, open(spec["out"], "w"))
                return -11, "Segmentation fault"
            json.dump(dict(row, status="ok", time_s=1.0, wall_s=2.0), open(spec["out"], "w"))
        return 0, ""

    monkeypatch.setattr(bench, "_launch", fake_launch)
    specs = [{"model": "m", "method": k} for k in ("ref", "plain", "crash", "fused", "vmap")]
    got = bench._group(specs, str(tmp_path), budget=10.0, startup=5.0)
    assert launches == [["ref", "plain", "crash", "fused", "vmap"], ["fused", "vmap"]]
    assert [r["method"] for r in got] == ["ref", "plain", "crash", "fused", "vmap"]
    assert [r["status"] for r in got] == ["ok", "ok", "error", "ok", "ok"]
    assert "signal 11" in got[2]["reason"] and all(r["row_wall_s"] == 2.0 for r in got if r["status"] == "ok")


def test_quick_bench_one_process_per_model(tmp_path):
    run = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--quick", "--device", "cpu", "--process", "model",
                          "--models", "mlp,llama", "--methods", "plain,fused,vmap", "--no-optim", "--no-plots",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    (found,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    result = json.load(open(tmp_path / found))
    assert {(r["model"], r["method"]) for r in result["rows"]} == {
        (m, k) for m in ("mlp", "llama") for k in ("plain", "fused", "vmap")}
    for r in result["rows"]:
        assert r["status"] == "ok" and (r["rel_err"] is None or r["rel_err"] < 1e-4), r
    assert any("each model's rows ran in one worker process" in n for n in result["notes"])


def test_largest_batch_search():
    """Doubling, then bisection, finds the largest batch that fits exactly; the cap stops FusedMAS's search."""
    sys.path.insert(0, ROOT)
    import torch

    from benchmarks import scale_bench

    def prepare(x):  # a pass that runs out of memory above 37 samples
        def run():
            if x.shape[0] > 37:
                raise MemoryError("out of memory")
            return x.sum()
        return run, lambda: None

    dev = torch.device("cpu")
    got = scale_bench.largest_batch(dev, prepare, lambda b: torch.zeros(b, 3), start=5, refine=10)
    assert got["batch"] == 37 and got["first_failure"] == 38 and not got["capped"]
    assert [p["batch"] for p in got["probes"]][:5] == [5, 10, 20, 40, 30]
    got = scale_bench.largest_batch(dev, prepare, lambda b: torch.zeros(b, 3), start=100, refine=10)
    assert got["batch"] == 37  # halving from a start that does not fit
    got = scale_bench.largest_batch(dev, prepare, lambda b: torch.zeros(b, 3), start=5, cap=16, refine=10)
    assert got["batch"] == 16 and got["capped"]
    got = scale_bench.largest_batch(dev, prepare, lambda b: torch.zeros(b, 3), start=64, refine=10, floor=40)
    assert got["batch"] is None


def test_scale_bench_quick_plumbing(tmp_path):
    """The GPU-scale benchmark at tiny sizes on the CPU (a 4 MiB limit stands in for the GPU's memory): the llm
    row, the largest batches and the kernel table all answer, and Ω matches ReferenceMAS."""
    run = subprocess.run([sys.executable, "-m", "benchmarks.scale_bench", "--quick", "--device", "cpu", "--models",
                          "mlp,gpt2", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    (found,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    assert found.startswith("cpu-scale-")
    res = json.load(open(tmp_path / found))
    llm = res["llm"]
    assert llm["name"] == "llm-1b" and llm["dtype"] == "bfloat16" and llm["omega_dtype"] == "torch.float32"
    assert llm["rel_err_vs_reference_2_samples"] < 1e-3
    assert llm["importance_vs_plain"] > 0 and llm["fused_peak_bytes"] > 0
    assert llm["fused_largest_batch"]["batch"] >= llm["config"]["batch"] and llm["vmap_largest_batch"]["batch"] >= 1
    assert set(res["batch"]) == {"mlp", "gpt2"}
    mlp = res["batch"]["mlp"]
    assert mlp["peers"]["vmap"]["batch"]
    for p in ("opacus", "backpack"):  # `make test` does not install the peers: where absent, a row says so
        assert mlp["peers"][p]["batch"] or mlp["peers"][p].get("unsupported") or mlp["peers"][p].get("error")
    # the MLP's per-sample gradients (N x 6.5K floats) dwarf its activations: FusedMAS reaches the cap
    assert mlp["fused"]["capped"] and mlp["ratio_vs_best_peer"] == 32.0
    rows = res["kernels"]["rows"]
    assert {r["op"] for r in rows} == {"linear_importance_", "conv_importance_", "tied_embedding_importance_",
                                       "norm_affine_importance_"}
    for r in rows:
        assert "error" not in r and r["time_s"] > 0 and r["vs_replaced"] > 0 and r["flops"] > 0, r
    assert (tmp_path / found.replace(".json", ".md")).exists()
