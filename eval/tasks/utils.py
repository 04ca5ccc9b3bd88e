"""lm-eval hooks of the ``kvlong`` suite: load a generated JSONL file and score a generation.

The score of one sample is the fraction of its answers found in the model's output, case-insensitively
(RULER's ``string_match_all``); a task's score is the mean over its samples, in [0, 1].
"""

from __future__ import annotations

import json
import re
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"


def load_kvlong(data_file: str, **_: object) -> dict:
    import datasets

    path = DATA_DIR / data_file
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run `python -m kvcache.eval.tasks.generate` to create the kvlong suite")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    # lm-eval's doc_to_target renders lists; keep answers as a list of strings for process_results
    return {"test": datasets.Dataset.from_list(rows)}


def score(prediction: str, answers: list[str]) -> float:
    """Fraction of ``answers`` contained in ``prediction`` (case-insensitive, control characters removed)."""
    pred = re.sub(r"[\x00-\x1f]", " ", prediction).strip().lower()
    return sum(1.0 for a in answers if a.lower() in pred) / len(answers)


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"score": score(results[0], list(doc["outputs"]))}
