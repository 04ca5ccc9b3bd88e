"""Tiny real runs of ``kvcache bench prompt|limit|quant`` through the harness: the JSON keeps every run, the
medians and spreads, the machine and its load, and a PNG is written. No time is asserted."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")
from test_eval_lm_eval import tiny_folder  # noqa: E402,F401  (fixture)

from kvcache.cli import main  # noqa: E402

RECORD = {"machine", "load_before", "load_after", "other_cpu_share", "busy", "busy_rule", "warnings"}


def test_prompt_bench_runs_alternating(tiny_folder, tmp_path):  # noqa: F811
    out = tmp_path / "prompt"
    assert main(["bench", "prompt", "--model", str(tiny_folder), "--policies", "streaming", "--prompt-length", "32",
                 "--repeats", "3", "--out", str(out)]) == 0
    report = json.loads((out / "prompt_bench.json").read_text())
    assert RECORD <= set(report) and report["machine"]["loadavg_at_end"] == report["load_after"]
    assert list(report["rows"]) == ["full", "streaming"]
    for row in report["rows"].values():
        assert len(row["prompt_s_runs"]) == 3 and row["prompt_s_min"] <= row["prompt_s"] <= row["prompt_s_max"]
    assert report["rows"]["full"]["ratio_vs_full"] == 1.0
    assert (out / "prompt_bench.png").stat().st_size > 0


def test_limit_bench_runs_alternating(tiny_folder, tmp_path):  # noqa: F811
    out = tmp_path / "limit"
    assert main(["limit-bench", "--model", str(tiny_folder), "--policies", "streaming", "--prompt-length", "48",
                 "--budget", "0.5", "--batch", "1", "--new-tokens", "3", "--repeats", "3", "--out", str(out)]) == 0
    report = json.loads((out / "limit_bench.json").read_text())
    assert RECORD <= set(report)
    full, streaming = report["rows"]["full"], report["rows"]["streaming"]
    assert (full["prompt_tokens"], streaming["prompt_tokens"]) == (24, 48)  # C = 0.5 x 48
    assert len(streaming["decode_s_per_step_runs"]) == 3 and len(streaming["prefill_s_runs"]) == 3
    assert streaming["kept_tokens_per_layer_mean"] > 0 and full["decode_ratio_vs_full_at_C"] == 1.0
    assert (out / "limit_bench.png").stat().st_size > 0


def test_quant_bench_writes_json_and_png(tmp_path):
    out = tmp_path / "quant.json"
    assert main(["bench", "quant", "--head-dims", "64", "--tokens", "128", "--lengths", "128", "--repeats", "2",
                 "--codecs", "none", "kivi:bits=4", "--speed-codecs", "kivi:bits=4", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert RECORD <= set(report)
    assert [r["codec"] for r in report["memory_and_error"]] == ["none", "kivi:bits=4"]
    (row,) = report["speed_decode_one_query"]
    for name in ("sdpa_fp32_cache", "sdpa_fp16_cache", "attend_packed_kivi:bits=4"):
        assert row[f"{name}_ms_min"] <= row[f"{name}_ms"] <= row[f"{name}_ms_max"]
    assert out.with_suffix(".png").stat().st_size > 0
