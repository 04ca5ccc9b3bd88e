"""``kvcache bench NAME``: one family of benchmark commands; plain ``kvcache bench --policy ...`` is ``bench decode``,
the older names stay as aliases, a bad NAME is one line and exit code 2. Dispatch only: nothing is measured."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from kvcache import cli
from kvcache.registry import UsageError


@pytest.fixture
def fake_benchmarks(monkeypatch):
    """Every benchmark routed to a stand-in module that records (benchmark, prog-less args) and returns 0."""
    calls: list[tuple[str, dict]] = []
    for name in cli.BENCHMARKS:
        module = types.ModuleType(f"fake_bench_{name}")

        def add_arguments(parser, name=name):
            parser.add_argument("--policy", default="snapkv")
            parser.add_argument("--fail", action="store_true")

        def run(args, name=name):
            if args.fail:
                raise UsageError("--budget 7 is not a budget")
            calls.append((name, vars(args)))
            return 0

        module.add_arguments, module.run = add_arguments, run
        monkeypatch.setitem(sys.modules, module.__name__, module)
        monkeypatch.setitem(cli.BENCHMARKS, name, (module.__name__, "help"))
    return calls


@pytest.mark.parametrize("argv, benchmark", [
    (["bench", "decode", "--policy", "h2o"], "decode"),
    (["bench", "--policy", "h2o"], "decode"),  # today's decode bench, unchanged
    (["bench"], "decode"),
    (["bench", "prompt"], "prompt"), (["bench", "limit"], "limit"), (["bench", "quant"], "quant"),
    (["bench", "serve"], "serve"), (["bench", "dit"], "dit"), (["bench", "kvpress"], "kvpress"),
    (["bench", "kernels"], "kernels"),
    (["limit-bench"], "limit"), (["prompt-bench"], "prompt"), (["quant-bench"], "quant"),
    (["vllm-bench"], "serve"), (["dit-bench"], "dit"),
])
def test_each_name_runs_its_benchmark(fake_benchmarks, argv, benchmark):
    assert cli.main(argv) == 0
    assert [name for name, _ in fake_benchmarks] == [benchmark]
    assert fake_benchmarks[0][1]["policy"] == ("h2o" if "h2o" in argv else "snapkv")


@pytest.mark.parametrize("argv, prog", [
    (["bench", "decode", "--fail"], "kvcache bench decode"),
    (["bench", "--fail"], "kvcache bench"),
    (["limit-bench", "--fail"], "kvcache limit-bench"),
])
def test_a_usage_error_names_the_command_typed(fake_benchmarks, capsys, argv, prog):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"{prog}: --budget 7 is not a budget\n"


def test_bench_help_lists_the_family(capsys):
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("decode", "prompt", "limit", "quant", "serve", "dit", "kvpress", "kernels"):
        assert f"\n  {name} " in out
    assert "kvcache bench --policy ... (options, no NAME) is kvcache bench decode" in out
    assert "kvcache vllm-bench (= bench serve)" in out


def test_top_level_help_shows_bench_not_the_old_names(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "bench" in out and "decode|prompt|limit|quant|serve|dit|kvpress" in out and "limit-bench" not in out


def test_a_bad_benchmark_name_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "kvcache.cli", "bench", "decod", "--policy", "h2o"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "unknown benchmark 'decod'" in proc.stderr and "decode, prompt, limit" in proc.stderr


@pytest.mark.parametrize("name", list(cli.BENCHMARKS))
def test_every_benchmark_module_wires_into_the_family(name, capsys):
    """The real modules: ``kvcache bench NAME --help`` parses their options under the family's name."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", name, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: kvcache bench {name} ")


def test_python_dash_m_is_the_same_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.bench_main("quant", ["--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: kvcache bench quant ")
