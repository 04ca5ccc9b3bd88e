"""The wheel claims only the ``kvcache`` name: the repository's floors install as kvcache.attention,
kvcache.engine_adapters and kvcache.eval, and everything imports from the installed copy alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

IMPORT_ALL = r"""
import importlib, pkgutil, sys
sys.path.insert(0, sys.argv[1])
import kvcache
assert kvcache.__file__.startswith(sys.argv[1]), kvcache.__file__
optional = {"vllm", "lm_eval", "diffusers", "transformers", "rouge_score", "sklearn", "matplotlib", "triton", "kvpress"}
bad = []
for info in pkgutil.walk_packages(kvcache.__path__, "kvcache."):
    try:
        module = importlib.import_module(info.name)
    except ModuleNotFoundError as err:
        if err.name.split(".")[0] not in optional:
            bad.append(f"{info.name}: {err}")
        continue
    if not getattr(module, "__file__", "").startswith(sys.argv[1]):
        bad.append(f"{info.name} imported from {module.__file__}")
for name in ("attention", "engine_adapters", "eval"):
    if name in sys.modules and getattr(sys.modules[name], "__file__", None):
        bad.append(f"top-level {name!r} was imported from {sys.modules[name].__file__}")
print("\n".join(bad))
sys.exit(1 if bad else 0)
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    source = tmp_path_factory.mktemp("source")  # a copy of the tracked files: the build leaves nothing in the checkout
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in files.stdout.splitlines():
        if (ROOT / name).is_file() and not name.startswith(("results/", "tests/")):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("kvcache-*.whl")
    return path


def test_wheel_top_level_names_are_only_kvcache(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        top = {n.split("/")[0] for n in names}
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert {t for t in top if not t.endswith(".dist-info")} == {"kvcache"}
    assert "kvcache.engine_adapters.vllm:register" in entry_points and "kvcache.cli:main" in entry_points
    for data in ("kvcache/eval/tasks/kvlong_1k.yaml", "kvcache/eval/tasks/data/passkey_1k.jsonl", "kvcache/attention/scoring.py"):
        assert data in names, data


def test_installed_wheel_imports_from_itself_alone(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-c", IMPORT_ALL, str(target)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
