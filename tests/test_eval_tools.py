"""kvcache sweep / bench / fidelity on a tiny random Llama: well-formed JSON, tables and PNGs (no timing asserted)."""

from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("lm_eval")
from test_eval_lm_eval import tiny_folder  # noqa: E402,F401  (fixture)

from kvcache.eval import bench, fidelity, sweep  # noqa: E402


def _args(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_sweep_writes_well_formed_json(tiny_folder, tmp_path):  # noqa: F811
    out = tmp_path / "sweep"
    args = _args(sweep, ["--model", str(tiny_folder), "--policies", "snapkv", "streaming", "--budgets", "0.5",
                         "--quants", "none", "kivi:bits=4:group_size=8", "--tasks", "kvlong_passkey_1k,kvlong_qa_1k", "--limit", "2",
                         "--batch-size", "2", "--out", str(out)])
    assert sweep.run(args) == 0
    data = json.loads((out / "sweep.json").read_text())
    assert [(c["policy"], c["budget"], c["quant"]) for c in data["configs"]] == [
        ("full", 1.0, "none"), ("full", 1.0, "kivi:bits=4:group_size=8"), ("snapkv", 0.5, "none"), ("streaming", 0.5, "none"),
        ("snapkv", 0.5, "kivi:bits=4:group_size=8"), ("streaming", 0.5, "kivi:bits=4:group_size=8"),
    ]
    for c in data["configs"]:
        assert set(c["tasks"]) == {"kvlong_passkey_1k", "kvlong_qa_1k"}
        assert all(0.0 <= v["score"] <= 1.0 and v["n"] == 2 for v in c["tasks"].values())
        assert c["mean"] == pytest.approx(sum(v["score"] for v in c["tasks"].values()) / 2)
        assert c["requests"] == 2 and c["mean_kv_bytes"] > 0
    full, kivi, snap, _, snap_kivi, _ = data["configs"]
    # every row keeps its samples (the task score is their mean), 95% intervals around the scores, and its CPU time
    for c in data["configs"]:
        for v in c["tasks"].values():
            assert [s["doc_id"] for s in v["samples"]] == [0, 1]
            assert v["score"] == pytest.approx(sum(s["score"] for s in v["samples"]) / 2)
            assert v["ci95"][0] <= v["score"] <= v["ci95"][1]
        assert c["mean_ci95"][0] <= c["mean"] <= c["mean_ci95"][1]
        assert c["cpu_seconds"] > 0
    assert data["cpu_seconds_total"] == pytest.approx(sum(c["cpu_seconds"] for c in data["configs"]), abs=0.2)
    # kvpress_compare renders the same prompt text as lm-eval (so its rows pair with these samples)
    import hashlib

    import transformers as tf

    from kvcache.eval import kvpress_compare

    tok = tf.AutoTokenizer.from_pretrained(tiny_folder)
    for task in ("passkey_1k", "qa_1k"):
        for row, logged in zip(kvpress_compare.load_rows(task, 2), full["tasks"][f"kvlong_{task}"]["samples"]):
            assert hashlib.sha256(kvpress_compare.prompt_text(tok, row).encode()).hexdigest() == logged["prompt_sha256"]
    assert snap["mean_kv_bytes"] < full["mean_kv_bytes"]  # measured from the cache tensors
    assert snap_kivi["mean_kv_bytes"] < snap["mean_kv_bytes"]
    assert kivi["bytes_per_stored_token"] < full["bytes_per_stored_token"]
    assert (out / "accuracy_vs_budget.png").stat().st_size > 10_000
    table = (out / "table.md").read_text()
    assert "| snapkv | uniform | none | 0.5 |" in table and "| snapkv | uniform | kivi:bits=4:group_size=8 | 0.5 |" in table
    # resuming does no new work and keeps the rows
    assert sweep.run(args) == 0
    assert json.loads((out / "sweep.json").read_text())["configs"] == data["configs"]


def test_sweep_rejects_bad_input(tiny_folder, tmp_path):  # noqa: F811
    from kvcache.registry import PolicyConfigError

    with pytest.raises(SystemExit, match="fractions"):
        sweep.run(_args(sweep, ["--model", str(tiny_folder), "--budgets", "2", "--out", str(tmp_path)]))
    with pytest.raises(PolicyConfigError, match="valid evict policies"):
        sweep.run(_args(sweep, ["--model", str(tiny_folder), "--policies", "snapk", "--out", str(tmp_path)]))
    with pytest.raises(PolicyConfigError, match="valid quant"):
        sweep.run(_args(sweep, ["--model", str(tiny_folder), "--quants", "zip", "--out", str(tmp_path)]))
    with pytest.raises(SystemExit, match="never downloads"):
        sweep.run(_args(sweep, ["--model", "nope/nope", "--out", str(tmp_path)]))


def test_bench_writes_json_and_plot(tiny_folder, tmp_path):  # noqa: F811
    out = tmp_path / "bench"
    args = _args(bench, ["--model", str(tiny_folder), "--policy", "streaming", "--budget", "0.5", "--prompt-lengths", "48", "96",
                         "--batch-sizes", "2", "--new-tokens", "3", "--out", str(out)])
    assert bench.run(args) == 0
    data = json.loads((out / "bench.json").read_text())
    rows = data["rows"]
    assert {(r["cache"], r["prompt_len"]) for r in rows} == {(c, n) for c in ("full", "streaming", "ratio") for n in (48, 96)}
    for r in rows:
        if r["cache"] == "ratio":
            assert 0 < r["kv_bytes_ratio"] < 1 and r["decode_speedup"] > 0 and r["peak_mem_ratio"] > 0
        else:
            assert r["ttft_s"] > 0 and r["decode_tok_s"] > 0 and r["kv_bytes"] > 0 and r["peak_rss_bytes"] > 0
            assert len(r["runs"]) == 3 and sorted(x["ttft_s"] for x in r["runs"])[1] == r["ttft_s"]  # median of 3
    full = {r["prompt_len"]: r["kv_bytes"] for r in rows if r["cache"] == "full"}
    # 2 layers x (K + V) x batch 2 x 2 kv heads x (prompt + 3 - 1 cached tokens) x 16 dims x 4 bytes
    assert full[48] == 2 * 2 * 2 * 2 * (48 + 2) * 16 * 4
    assert (out / "bench.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="new-tokens"):
        bench.run(_args(bench, ["--model", str(tiny_folder), "--new-tokens", "1", "--out", str(out)]))


def test_bench_with_a_codec(tiny_folder, tmp_path):  # noqa: F811
    out = tmp_path / "bench_quant"
    args = _args(bench, ["--model", str(tiny_folder), "--policy", "full", "--quant", "kivi:bits=2:group_size=8:residual=8",
                         "--prompt-lengths", "64", "--batch-sizes", "1", "--new-tokens", "3", "--out", str(out)])
    assert bench.run(args) == 0
    rows = {r["cache"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}
    assert set(rows) == {"full", "full+kivi:bits=2:group_size=8:residual=8", "ratio"}
    assert rows["ratio"]["kv_bytes_ratio"] < 0.5  # 2-bit codes + fp16 scales vs fp32, the residual window aside
    assert rows["full"]["kv_bytes_per_token"] == rows["full"]["kv_bytes"] / 64


def test_fidelity_writes_json(tiny_folder, tmp_path):  # noqa: F811
    out = tmp_path / "fid"
    args = _args(fidelity, ["--model", str(tiny_folder), "--policies", "streaming", "--budgets", "0.5", "1.0", "--docs", "1",
                            "--prefix-tokens", "64", "--ppl-tokens", "9", "--chunk", "4", "--new-tokens", "4", "--out", str(out)])
    assert fidelity.run(args) == 0
    data = json.loads((out / "fidelity.json").read_text())
    full, half, whole = data["configs"]
    assert full["rougeL_vs_full"] == 1.0 and whole["rougeL_vs_full"] == 1.0  # budget 1.0 reproduces the full cache
    assert whole["ppl"] == pytest.approx(full["ppl"], rel=1e-4)
    assert half["ppl"] != pytest.approx(full["ppl"], rel=1e-4)
    assert (out / "fidelity.png").exists()


def test_wilson_interval_matches_the_formula():
    # Wilson (1927) 95% intervals, reference values from the closed form with z = 1.959964
    assert sweep.wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    assert sweep.wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-4)
    assert sweep.wilson_interval(24, 24) == pytest.approx((0.86202, 1.0), abs=1e-4)
    with pytest.raises(ValueError):
        sweep.wilson_interval(0, 0)


def test_bootstrap_intervals_pair_with_the_full_cache():
    full = {"a": {i: float(i % 4 != 0) for i in range(24)}, "b": {i: float(i % 2) for i in range(24)}}
    same = sweep.bootstrap_intervals(full, full)
    assert same["ratio_ci95"] == pytest.approx([1.0, 1.0])  # paired draws: a configuration equal to full is exactly 100%
    mean = (18 / 24 + 12 / 24) / 2
    assert same["mean_ci95"][0] < mean < same["mean_ci95"][1]
    worse = {"a": {i: float(i % 8 == 1) for i in range(24)}, "b": dict(full["b"])}
    ci = sweep.bootstrap_intervals(worse, full)
    assert ci["ratio_ci95"][1] < 1.0 and ci["mean_ci95"][1] < same["mean_ci95"][1]
    assert "ratio_ci95" not in sweep.bootstrap_intervals(worse, None)


def test_kvpress_summary_pairs_samples_and_names_the_best_press():
    from kvcache.eval import kvpress_compare

    def row(lib, policy, keep, task, scores):
        samples = [{"doc_id": i, "score": s, "prompt_sha256": f"{task}{i}"} for i, s in enumerate(scores)]
        return {"library": lib, "policy": policy, "keep": keep, "task": task, "n": len(scores), "samples": samples,
                "score": sum(scores) / len(scores), "decode_tok_s": None, "kv_bytes": None}

    ours = [row("kvcache", "full", 1.0, "t", [1, 1, 1, 1]), row("kvcache", "snapkv", 0.25, "t", [1, 1, 1, 0]),
            row("kvcache", "tova", 0.25, "t", [1, 0, 0, 0])]
    theirs = [row("kvpress", "full", 1.0, "t", [1, 1, 1, 1]), row("kvpress", "snapkv", 0.25, "t", [0, 0, 1, 0]),
              row("kvpress", "tova", 0.25, "t", [1, 1, 0, 0])]
    result = {"tasks": ["t"], "kvcache": {"rows": ours}, "kvpress": {"rows": theirs}}
    summary = kvpress_compare.summarise(result)
    by = {(s["policy"], s["keep"]): s for s in summary["pairs"]}
    assert by[("full", 1.0)]["diff"] == 0 and by[("full", 1.0)]["diff_ci95"] == [0.0, 0.0]
    assert by[("snapkv", 0.25)]["diff"] == pytest.approx(0.5) and by[("snapkv", 0.25)]["same_prompts"]
    lo, hi = by[("snapkv", 0.25)]["diff_ci95"]
    assert (lo, hi) == (0.0, 1.0)  # differences 1, 1, 0, 0: a draw of all 0s or all 1s has probability 1/16 > 2.5%
    assert summary["best_at_keep"]["0.25"] == {"kvpress_best": "TOVAPress", "kvpress_best_mean": 0.5,
                                               "kvcache_best": "snapkv", "kvcache_best_mean": 0.75}
    assert "| snapkv / SnapKVPress | 0.25 | 0.750 | 0.250 | +0.500" in kvpress_compare.markdown_table(result)


def test_kvpress_speed_ratios_are_of_medians_per_library():
    from kvcache.eval.kvpress_speed import summarise

    def run(side, full, snap):
        return {"side": side, "rows": {"full": {"decode_tok_s": full, "prompt_s": 1.0}, "snapkv": {"decode_tok_s": snap, "prompt_s": 1.0}}}

    runs = [run("kvcache", 20, 22), run("kvpress", 21, 20), run("kvcache", 19, 30), run("kvpress", 20, 18),
            run("kvcache", 21, 21), run("kvpress", 22, 19)]
    summary = summarise(runs, ["snapkv"])
    assert summary["snapkv"]["kvcache"]["decode_tok_s"] == 22 and summary["snapkv"]["kvpress"]["decode_tok_s"] == 19
    assert summary["snapkv"]["kvcache_vs_kvpress"] == pytest.approx(22 / 19)
    assert summary["snapkv"]["kvcache"]["vs_own_full"] == pytest.approx(22 / 20)
    assert (summary["snapkv"]["kvcache"]["min"], summary["snapkv"]["kvcache"]["max"]) == (21, 30)


def test_vllm_plan_size_measures_the_real_planner(tmp_path, capsys):
    """The plan the scheduler sends each step, at N requests: every request compacted at its prompt step, then
    only shifts (SnapKV) or shifts, decode captures and periodic compactions (H2O); bad sizes exit 2."""
    from kvcache.eval import vllm_plan_size

    out = tmp_path / "plan.json"
    assert vllm_plan_size.main(["--requests", "20", "--decode-steps", "8", "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    snapkv, h2o = report["policies"]["snapkv"], report["policies"]["h2o"]
    assert report["requests"] == 20 and report["machine"]["loadavg_at_end"] is not None
    assert snapkv["prompt_step_bytes"] > snapkv["decode_step_bytes_median"] > 0
    assert snapkv["decode_steps_with_compactions"] == 0 and h2o["decode_steps_with_compactions"] >= 1
    assert h2o["decode_step_bytes_median"] > snapkv["decode_step_bytes_median"]  # decode captures too
    assert vllm_plan_size.main(["--requests", "0"]) == 2
    assert "--requests must be >= 1" in capsys.readouterr().err
