"""The kvlong task generator: deterministic, shipped files up to date, every answer findable exactly once."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from kvcache.eval.tasks import generate as gen
from kvcache.eval.tasks import utils as task_utils

TASKS_DIR = Path(gen.__file__).resolve().parent


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix in (".yaml", ".jsonl")}


def test_same_seed_same_files(tmp_path):
    hay = gen.load_haystack()
    a = gen.write_suite(tmp_path / "a", [1024, 2048], 3, 7, hay, progress=False)
    b = gen.write_suite(tmp_path / "b", [1024, 2048], 3, 7, hay, progress=False)
    assert len(a) == len(b) == 2 * 2 * len(gen.TASKS) + 2 + 1
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    other = gen.write_suite(tmp_path / "c", [1024, 2048], 3, 8, hay, progress=False)
    assert other and _files(tmp_path / "a") != _files(tmp_path / "c")  # the seed matters


def test_shipped_suite_is_what_the_generator_writes(tmp_path):
    gen.write_suite(tmp_path, list(gen.DEFAULT_LENGTHS), gen.DEFAULT_SAMPLES, gen.DEFAULT_SEED, gen.load_haystack(), progress=False)
    fresh = _files(tmp_path)
    shipped = {k: v for k, v in _files(TASKS_DIR).items() if k in fresh}
    assert set(fresh) == set(shipped), "run `python -m kvcache.eval.tasks.generate` and commit eval/tasks"
    stale = [k for k in fresh if fresh[k] != shipped[k]]
    assert not stale, f"stale generated files {stale[:5]}: run `python -m kvcache.eval.tasks.generate`"


def _shipped_rows():
    for path in sorted((TASKS_DIR / "data").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            yield json.loads(line)


def test_every_answer_present_exactly_once():
    rows = list(_shipped_rows())
    assert {(r["task"], r["length"]) for r in rows} == {(t, n) for t in gen.TASKS for n in gen.DEFAULT_LENGTHS}
    for row in rows:
        text = row["input"].lower()
        if row["task"] == "vartrack":
            for name in row["outputs"]:
                assert text.count(f"var {name.lower()} =") == 1
            assert text.count(f"= {row['value']}.") == 1
        elif row["task"] == "freqword":
            gen.check_sample("freqword", row)  # answers are the strict top-3 words
        else:
            for answer in row["outputs"]:
                assert text.count(answer.lower()) == 1, (row["task"], row["length"], row["index"], answer)


def test_haystack_is_varied_natural_text():
    hay = gen.load_haystack()
    assert len(hay) > 300 and len(set(hay)) == len(hay)
    words = " ".join(hay).split()
    assert len(words) > 12000 and len(set(words)) > 2000  # not one repeated sentence
    row = next(r for r in _shipped_rows() if r["task"] == "passkey" and r["length"] == 4096)
    sentences = [s for s in row["input"].split(". ") if len(s) > 40]
    assert len(set(sentences)) > 0.95 * len(sentences)


def test_check_sample_rejects_a_duplicated_answer():
    rng = random.Random("x")
    sample = gen.make_passkey(rng, gen.load_haystack(), 1024)
    gen.check_sample("passkey", sample)
    sample["input"] += " " + sample["outputs"][0]
    with pytest.raises(AssertionError):
        gen.check_sample("passkey", sample)


def test_scoring():
    assert task_utils.score(" 1234567.", ["1234567"]) == 1.0
    assert task_utils.score("ABCDE, fghij", ["abcde", "FGHIJ", "KLMNO", "PQRST"]) == 0.5
    assert task_utils.process_results({"outputs": ["Belgate"]}, ["the town of Kesholm"]) == {"score": 0.0}


def test_yaml_groups_cover_the_suite():
    text = (TASKS_DIR / "kvlong.yaml").read_text()
    for task in gen.TASKS:
        for n in gen.CI_LENGTHS:
            assert f"- {gen.task_name(task, n)}\n" in text
        assert gen.task_name(task, 8192) not in text
        assert (TASKS_DIR / f"{gen.task_name(task, 8192)}.yaml").exists()
