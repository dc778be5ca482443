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
