"""``kvcache limit-bench`` bookkeeping: every run is kept, ratios are of medians, the spread is recorded."""

from __future__ import annotations

import json
import re

import pytest

from kvcache.eval.limit_bench import save


def test_ratios_are_of_medians_and_every_run_is_kept(tmp_path) -> None:
    rows = {
        "full": {"prompt_tokens": 8, "decode_s_per_step_runs": [0.010, 0.012, 0.011], "prefill_s_runs": [1.0, 1.2, 1.1]},
        "h2o": {"prompt_tokens": 32, "decode_s_per_step_runs": [0.013, 0.030, 0.0132], "prefill_s_runs": [4.0, 4.4, 4.2]},
    }
    meta = {"question": "q", "load_before": [1.5, 1.2, 1.0], "load_after": [1.7, 1.3, 1.0]}
    report = save(meta, rows, tmp_path)
    h2o = report["rows"]["h2o"]
    assert h2o["decode_s_per_step"] == 0.0132  # the median, not the fastest or the mean
    assert (h2o["decode_s_per_step_min"], h2o["decode_s_per_step_max"]) == (0.013, 0.030)
    assert h2o["prefill_s"] == 4.2
    assert h2o["decode_ratio_vs_full_at_C"] == pytest.approx(0.0132 / 0.011)
    written = json.loads((tmp_path / "limit_bench.json").read_text())
    assert written["rows"]["h2o"]["decode_s_per_step_runs"] == [0.013, 0.030, 0.0132]
    assert written["load_before"] == [1.5, 1.2, 1.0] and written["load_after"] == [1.7, 1.3, 1.0]
    assert (tmp_path / "limit_bench.png").exists()


def test_prompt_bench_ratios_are_of_medians_against_the_full_cache(tmp_path) -> None:
    from kvcache.eval.prompt_bench import save as save_prompt

    rows = {"full": {"prompt_s_runs": [2.0, 2.2, 2.1]}, "keyformer": {"prompt_s_runs": [3.0, 9.0, 3.3]}}
    report = save_prompt({"question": "q", "load_before": [1.0] * 3, "load_after": [1.1] * 3}, rows, tmp_path)
    keyformer = report["rows"]["keyformer"]
    assert keyformer["prompt_s"] == 3.3 and (keyformer["prompt_s_min"], keyformer["prompt_s_max"]) == (3.0, 9.0)
    assert keyformer["ratio_vs_full"] == pytest.approx(3.3 / 2.1)
    assert json.loads((tmp_path / "prompt_bench.json").read_text())["rows"]["keyformer"]["prompt_s_runs"] == [3.0, 9.0, 3.3]
    assert (tmp_path / "prompt_bench.png").exists()


def test_prompt_bench_refuses_fewer_than_three_repeats(capsys) -> None:
    from kvcache.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["prompt-bench", "--repeats", "2"])
    assert exit_.value.code == 2
    assert "--repeats must be >= 3" in capsys.readouterr().err


@pytest.mark.parametrize("command, argv, message", [
    ("prompt-bench", ["--prompt-length", "0"], "--prompt-length must be an integer >= 1"),
    ("prompt-bench", ["--batch", "0"], "--batch must be an integer >= 1"),
    ("limit-bench", ["--new-tokens", "1"], "--new-tokens .* must be an integer >= 2"),
])
def test_bench_sizes_are_checked_before_any_work(command, argv, message, capsys) -> None:
    from kvcache.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([command, *argv])
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err)
