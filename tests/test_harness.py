"""``kvcache.eval.harness``, the one way every ``kvcache bench ...`` measures: alternation order, medians and
spread, ratios of medians, the busy rule (load mocked) and the JSON + PNG. Bookkeeping only: no time is asserted."""

from __future__ import annotations

import contextlib
import json
import random

import numpy as np
import pytest

from kvcache.eval import harness


def test_configurations_alternate_within_every_repeat():
    calls, seen = [], []
    runs = harness.alternate(["a", "b", "c"], 3, lambda name: calls.append(name) or len(calls), warmup=1,
                             after_each=lambda name, repeat, result: seen.append((name, repeat, result)))
    assert calls == ["a", "b", "c"] * 4  # one warm-up round, then A B C A B C A B C: never all A then all B
    assert runs == {"a": [4, 7, 10], "b": [5, 8, 11], "c": [6, 9, 12]}  # warm-up results discarded
    assert seen[:4] == [("a", 0, 4), ("b", 0, 5), ("c", 0, 6), ("a", 1, 7)]


def test_stats_are_median_min_max_and_quartiles():
    s = harness.stats([3.0, 1.0, 2.0, 10.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.5, 1.0, 10.0, 4)  # a median, not the mean (4.0)
    assert (s["q1"], s["q3"]) == pytest.approx((1.75, 4.75))
    rng = random.Random(0)
    for n in (1, 2, 5, 8):
        values = [rng.random() for _ in range(n)]
        got = harness.stats(values)
        assert [got["q1"], got["median"], got["q3"]] == pytest.approx(np.percentile(values, [25, 50, 75]).tolist())
    assert harness.spread("x_s", [0.3, 0.1, 0.2]) == {"x_s": 0.2, "x_s_min": 0.1, "x_s_max": 0.3,
                                                       "x_s_iqr": pytest.approx([0.15, 0.25])}
    with pytest.raises(ValueError):
        harness.stats([])


def test_ratios_are_of_medians_against_the_named_baseline():
    assert harness.ratios({"full": 2.0, "snapkv": 3.0}, "full") == {"full": 1.0, "snapkv": 1.5}
    with pytest.raises(KeyError, match="stock"):
        harness.ratios({"full": 2.0}, "stock")
    rows = {"full": {"t_runs": [2.0, 2.2, 2.1]}, "h2o": {"t_runs": [3.0, 9.0, 3.3]}}
    harness.summarise_rows(rows, "t", "full", "vs_full")
    assert rows["h2o"]["t"] == 3.3 and (rows["h2o"]["t_min"], rows["h2o"]["t_max"]) == (3.0, 9.0)
    assert rows["h2o"]["vs_full"] == pytest.approx(3.3 / 2.1)  # medians: the 9.0 outlier does not move it
    assert rows["full"]["vs_full"] == 1.0
    no_baseline = {"h2o": {"t_runs": [1.0]}}
    harness.summarise_rows(no_baseline, "t", "full", "vs_full")
    assert "vs_full" not in no_baseline["h2o"]


def test_time_calls_alternates_and_enters_the_context_outside_the_timer():
    events = []

    @contextlib.contextmanager
    def around(name):
        events.append(f"enter {name}")
        yield
        events.append(f"exit {name}")

    def timer(fn):
        events.append("timer")
        fn()
        return 0.001 * len(events)  # a stand-in timer: the numbers are bookkeeping, not times

    calls = {"a": lambda: events.append("a"), "b": lambda: events.append("b")}
    row = harness.time_calls(calls, 2, timer=timer, around=around, prefix="p_")
    assert [e for e in events if e in ("a", "b")] == ["a", "b"] * 3  # a warm-up round, then two alternating
    assert events[:5] == ["enter a", "timer", "a", "exit a", "enter b"]
    assert set(row) == {f"p_{n}_ms{s}" for n in "ab" for s in ("", "_min", "_max", "_iqr")}
    assert row["p_a_ms_min"] <= row["p_a_ms"] <= row["p_a_ms_max"]


def test_busy_rule_on_a_mocked_load(monkeypatch, capsys):
    assert harness.busy_warning([0.9, 0.5, 0.5], cpus=2) is None  # 0.45 per core
    warning = harness.busy_warning([1.5, 1.0, 1.0], cpus=2)  # 0.75 per core
    assert "1.50 on 2 cores" in warning and "0.5 per core" in warning
    assert harness.busy_warning([], cpus=2) is None  # no load average on this OS: no claim

    monkeypatch.setattr(harness.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(harness, "load_average", lambda: [3.0, 2.0, 1.0])
    recorder = harness.Recorder("cpu")
    assert "WARNING: load average 3.00 on 2 cores" in capsys.readouterr().err
    record = recorder.record()
    assert record["busy"] and record["load_before"] == [3.0, 2.0, 1.0] and record["load_after"] == [3.0, 2.0, 1.0]
    assert record["machine"]["cpus"] == 2 and record["machine"]["loadavg_at_end"] == [3.0, 2.0, 1.0]
    assert len(record["warnings"]) == 1 and "per core" in record["busy_rule"]

    monkeypatch.setattr(harness, "load_average", lambda: [0.1, 0.1, 0.1])
    quiet = harness.Recorder("cpu")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(quiet.others, "share", lambda: 0.4)  # other processes took 40% of the CPU meanwhile
    final = quiet.finish()
    assert final["busy"] and "other processes used 40%" in final["warnings"][-1]
    assert "WARNING: machine busy during the run" in capsys.readouterr().err


def test_other_cpu_share_is_a_fraction():
    assert 0.0 <= harness.OtherCpu().share() <= 1.0


def test_write_report_writes_json_png_and_table(tmp_path, capsys):
    rows = {"full": {"t_runs": [2.0, 2.2, 2.1]}, "h2o": {"t_runs": [3.0, 9.0, 3.3]}}
    harness.summarise_rows(rows, "t", "full", "vs_full")
    report = {"question": "q", "load_before": [0.1] * 3, "load_after": [0.2] * 3, "rows": rows}

    def plot(rep, path):
        harness.ratio_bar_plot(rep["rows"], "t", "vs_full", "full", "t / full", rep, path)

    written = harness.write_report(report, tmp_path / "sub" / "r.json", plot, lambda rep: "| table |")
    assert written == [tmp_path / "sub" / "r.json", tmp_path / "sub" / "r.png", tmp_path / "sub" / "table.md"]
    assert json.loads((tmp_path / "sub" / "r.json").read_text())["rows"]["h2o"]["t_runs"] == [3.0, 9.0, 3.3]
    assert (tmp_path / "sub" / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| table |" in capsys.readouterr().out

    def no_matplotlib(rep, path):
        raise ImportError("No module named 'matplotlib'")

    assert harness.write_report(report, tmp_path / "b.json", no_matplotlib) == [tmp_path / "b.json"]
    assert "no PNG written" in capsys.readouterr().err
