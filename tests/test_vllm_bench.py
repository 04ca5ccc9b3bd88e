"""``kvcache vllm-bench``: argument checks (no engine) and the JSON/PNG of a tiny run (one engine, ~30 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

from kvcache.cli import main  # noqa: E402


@pytest.mark.parametrize("argv,message", [
    (["--policies", "snapkv,nosuch"], "nosuch"),
    (["--requests", "0"], "--requests must be >= 1"),
    (["--arrivals", "burst"], "--arrivals"),
    (["--budget", "lots"], "budget"),
    (["--output", "bench.csv"], ".json"),
])
def test_user_mistakes_exit_2_naming_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["vllm-bench", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_prompt_tokens_must_name_a_kvlong_length(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["vllm-bench", "--prompt-tokens", "1000"])
    assert exit_info.value.code == 2
    assert "1024" in capsys.readouterr().err


@pytest.mark.e2e
def test_tiny_run_writes_the_report(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, "-m", "kvcache.eval.vllm_bench", "--policies", "streaming", "--requests", "2",
        "--max-tokens", "4", "--prefill-max-tokens", "0", "--repeats", "1", "--arrivals", "all,poisson",
        "--request-rate", "5", "--no-hf-reference", "--output", str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    meta = report["meta"]
    assert len(meta["load_before"]) == 3 and len(meta["load_after"]) == 3 and isinstance(meta["busy"], bool)
    assert [(s["setting"], s["arrival"]) for s in report["scenarios"]] == [("decode-heavy", "all"), ("decode-heavy", "poisson")]
    for scenario in report["scenarios"]:
        stock, streaming = scenario["configs"]
        assert (stock["name"], streaming["name"]) == ("stock", "streaming")
        assert stock["throughput_vs_stock"] == 1.0 and stock["concurrency_vs_stock"] == 1.0
        assert stock["compaction_share"] == 0 and stock["blocks_freed"] == 0
        assert streaming["blocks_freed"] > 0 and 0 < streaming["compaction_share"] < 1  # 1K-token prompts evicted
        for row in scenario["configs"]:
            assert row["tokens_per_s"] == pytest.approx(2 * 4 / row["wall_s"], rel=0.05)  # all 8 tokens generated
            assert row["leaked_blocks"] == 0 and row["preemptions"] == 0
            assert len(row["tokens_per_s_spread"]) == 2 and 0 <= row["accuracy"] <= 1
            assert row["ttft_p50_s"] <= row["ttft_p99_s"]
    poisson = report["scenarios"][1]["arrival_times_s"]
    assert poisson[0] == 0 and poisson[1] > 0

    # one report per quiet window, merged: the runs are pooled and summarised again
    merged_path = tmp_path / "merged.json"
    assert main(["vllm-bench", "--merge", str(out), str(out), "--output", str(merged_path)]) == 0
    merged = json.loads(merged_path.read_text())
    assert merged["meta"]["repeats"] == 2 and len(merged["meta"]["windows"]) == 2
    assert merged_path.with_suffix(".png").stat().st_size > 0
    for before, after in zip(report["scenarios"], merged["scenarios"]):
        for row, merged_row in zip(before["configs"], after["configs"]):
            assert merged_row["repeats"] == 2 and len(merged_row["runs"]) == 2
            assert merged_row["tokens_per_s"] == pytest.approx(row["tokens_per_s"])
            assert merged_row["throughput_vs_stock"] == pytest.approx(row["throughput_vs_stock"])


def test_prefix_tokens_out_of_range_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "serve", "--workload", "shared-prefix", "--prefix-tokens", "10"])
    assert exit_info.value.code == 2
    assert "--prefix-tokens must be in [256, 3072]" in capsys.readouterr().err


@pytest.mark.e2e
def test_shared_prefix_workload_reuses_the_prefix_and_compares_without(tmp_path):
    """One system prompt for every request: each configuration runs with vLLM's prefix cache read and with it
    skipped; the reuse rows hit the cache, the no-reuse rows do not, both leave the pool whole."""
    out = tmp_path / "shared.json"
    cmd = [
        sys.executable, "-m", "kvcache.eval.vllm_bench", "--workload", "shared-prefix", "--prefix-tokens", "512",
        "--policies", "snapkv", "--requests", "3", "--max-tokens", "4", "--prefill-max-tokens", "0", "--repeats", "1",
        "--arrivals", "poisson", "--request-rate", "20", "--no-hf-reference", "--output", str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["meta"]["workload"] == "shared-prefix"
    rows = {row["name"]: row for row in report["scenarios"][0]["configs"]}
    assert list(rows) == ["stock", "stock-no-reuse", "snapkv", "snapkv-no-reuse"]
    for name, row in rows.items():
        assert row["leaked_blocks"] == 0 and row["runs"][0]["output_tokens"] == 12
        if name.endswith("-no-reuse"):
            assert row["prefix_hit_share"] == 0
        else:
            assert row["prefix_hit_share"] > 0.4  # requests 2 and 3 read the 512-token system prompt's blocks
    assert rows["snapkv"]["blocks_freed"] > 0 and rows["snapkv-no-reuse"]["blocks_freed"] > 0


def test_merge_refuses_reports_of_different_setups(tmp_path, capsys):
    paths = []
    for i, budget in enumerate(("0.25", "0.5")):
        path = tmp_path / f"r{i}.json"
        path.write_text(json.dumps({"meta": {"model": "m", "budget": budget, "warnings": []}, "scenarios": []}))
        paths.append(str(path))
    with pytest.raises(SystemExit) as exit_info:
        main(["vllm-bench", "--merge", *paths, "--output", str(tmp_path / "out.json")])
    assert exit_info.value.code == 2
    assert "different setup (budget)" in capsys.readouterr().err


def test_a_busy_run_is_left_out_of_the_medians_when_a_quiet_one_exists():
    from kvcache.eval.vllm_bench import BUSY_SHARE, SUMMARISED, summarise

    def run(wall, others):
        return {**{key: 0.0 for key in SUMMARISED}, "wall_s": wall, "other_cpu_share": others, "running_trace": [1]}

    row = summarise("stock", None, [run(64.0, 0.02), run(132.0, BUSY_SHARE + 0.1), run(68.0, 0.02)])
    assert row["wall_s"] == 66.0 and row["wall_s_spread"] == [64.0, 68.0]
    assert row["busy_runs_left_out"] == 1 and row["repeats"] == 2 and len(row["runs"]) == 3
    only_busy = summarise("stock", None, [run(132.0, 0.5)])  # nothing quiet: reported, not hidden
    assert only_busy["wall_s"] == 132.0 and only_busy["busy_runs_left_out"] == 0
