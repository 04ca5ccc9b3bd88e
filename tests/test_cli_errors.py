"""A user's mistake on the command line gives one line naming the problem and the fix, and exit code 2."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest


def kvcache(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvcache.cli", *args], capture_output=True, text=True, timeout=timeout)


def one_clear_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_prompt_file(tmp_path):
    one_clear_line(kvcache("generate", "--prompt-file", str(tmp_path / "nope.txt")), "nope.txt", "no such file")


def test_unknown_model():
    one_clear_line(kvcache("generate", "--model", "no/such-model", "hello"), "no/such-model", "never downloads")


def test_bad_policy_spec():
    one_clear_line(kvcache("generate", "--kv-policy", "keyformr", "hello"), "keyformr", "valid")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_serve_without_vllm_names_the_make_target():
    one_clear_line(kvcache("serve", "smollm2-135m", "--kv-policy", "snapkv"), "make setup-vllm", "not installed")
