"""Generate the ``kvlong`` long-context task suite (lm-eval YAML + JSONL), deterministically, offline.

    python -m kvcache.eval.tasks.generate                      # rewrite eval/tasks/ (1K, 2K, 4K, 8K; 24 samples each)
    python -m kvcache.eval.tasks.generate --out DIR --lengths 1024 2048 --samples 4 --seed 7

Same seed and options, same bytes: every random choice comes from ``random.Random`` seeded with a string
built from (seed, task, length, sample index); nothing depends on the Python version, a tokenizer or
the network. Context sizes are set in characters with ratios measured once with the SmolLM2 tokenizer
(``CHARS_PER_TOKEN``); the real token counts are reported by ``--report-tokens TOKENIZER_DIR``.

Tasks (RULER-style, arXiv 2404.06654, re-implemented; answers scored by case-insensitive containment,
as RULER's ``string_match_all``: the fraction of a sample's answers found in the model's output):

* ``passkey``    one 7-digit pass key in a natural-language haystack.
* ``multikey``   needles "the special magic number for KEY is: VALUE" for 4 keys (3 distractors); ask one.
* ``multivalue`` 4 values for the same key; all must be listed.
* ``vartrack``   variable tracking: a chain of 4 hops ``VAR B = VAR A`` from one value, plus a distractor
                 chain; list every variable that holds the value.
* ``freqword``   frequent-word extraction (RULER ``fwe``): coded words drawn with Zipf-like counts;
                 name the three most frequent (their counts are strictly above every other word's).
* ``qa``         question answering over a long generated document: fictional biographies (town of
                 birth, profession, year) interleaved with the haystack; ask one fact of one person.

Haystack: ``data/haystack_python_docs.txt``, prose paragraphs of the Python Language Reference as shipped
in CPython's ``pydoc_data/topics.py`` (Python Software Foundation License 2.0; see ``data/SOURCE.md``),
frozen in the repo so a different Python version cannot change the suite. ``--refresh-haystack`` rebuilds
it from the running interpreter.

Every answer of passkey, multikey, multivalue and qa occurs exactly once in its context (checked while
generating, case-insensitively); vartrack's names each have exactly one ``VAR NAME =`` assignment and its
value occurs once; freqword's answers are by construction the strict top-3 of the word counts.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import string
import sys
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
DATA_DIR = TASKS_DIR / "data"
HAYSTACK_FILE = DATA_DIR / "haystack_python_docs.txt"

TASKS: tuple[str, ...] = ("passkey", "multikey", "multivalue", "vartrack", "freqword", "qa")
DEFAULT_LENGTHS: tuple[int, ...] = (1024, 2048, 4096, 8192)
CI_LENGTHS: tuple[int, ...] = (1024, 2048, 4096)  # the ``kvlong`` group; 8K has its own group
DEFAULT_SAMPLES = 24  # issue 13: >= 24 a task for confidence intervals; samples 0-15 are the earlier 16-sample suite, unchanged
DEFAULT_SEED = 1234
# Fraction of the nominal length the prompt may take (room for the answer and chat formatting).
FILL = 0.90
# Characters per token of each kind of text, measured with the SmolLM2-135M tokenizer.
CHARS_PER_TOKEN = {"prose": 4.3, "coded": 2.2}
MAX_GEN_TOKS = {"passkey": 16, "multikey": 16, "multivalue": 48, "vartrack": 40, "freqword": 24, "qa": 12}

_ADJECTIVES = (
    "amber autumn brave bright calm clever cosmic crimson curious dusty eager early faded fierce gentle "
    "gilded golden hidden hollow humble icy jolly lively lonely lucky misty modest noble odd pale patient "
    "proud quiet rapid restless rusty silent silver sleepy slow solemn steady stormy swift tidy velvet "
    "wandering wild windy wise"
).split()
_NOUNS = (
    "anchor badger beacon bison canyon cedar comet crane delta ember falcon fjord glacier harbor heron "
    "island jaguar kestrel lagoon lantern meadow mesa nebula oasis orchard otter pebble pelican quarry "
    "raven reef sparrow summit thistle tundra valley walrus willow yak zephyr"
).split()
_FIRST = (
    "Ada Bram Cora Dmitri Edda Faro Greta Hollis Ines Jasper Kaia Lorcan Mira Nils Orla Piet Quilla Rosalind "
    "Silas Tamsin Ulric Vesna Wendel Xenia Yorick Zelda Anselm Brigid Cassius Delphine"
).split()
_LAST = (
    "Abernathy Blackwood Corrigan Draycott Ellery Fairweather Grimsby Hartwell Ivesdale Jessop Kettering "
    "Lindqvist Marchbank Northcote Ostrander Pemberton Quenby Ravensworth Selwyn Thornbury Underhill "
    "Vantongeren Whitlock Yardley Zoller"
).split()
_TOWN_START = "Ash Bel Brin Cal Dun Elm Fen Glen Hol Kes Lang Mar Nor Oak Pen Quil Ros Stan Thorn Wick".split()
_TOWN_END = "borough bridge brook combe cross dale field ford gate haven holm mere moor ness stead thwaite well wick".split()
_PROFESSIONS = (
    "lighthouse keeper|glassblower|cartographer|beekeeper|clockmaker|bookbinder|shipwright|astronomer|"
    "cooper|tanner|falconer|locksmith|apothecary|stonemason|weaver|ferryman|saddler|chandler|engraver|"
    "harpist|perfumer|botanist|surveyor|cobbler"
).split("|")


# ---------------------------------------------------------------------------------------------- haystack


def extract_haystack_from_python_docs() -> list[str]:
    """Prose paragraphs of CPython's ``pydoc_data.topics`` (no code, no long numbers), in topic order."""
    import pydoc_data.topics as topics  # stdlib

    paragraphs: list[str] = []
    seen: set[str] = set()
    for key in sorted(topics.topics):
        for block in re.split(r"\n\s*\n", topics.topics[key]):
            lines = block.split("\n")
            if any(line.startswith((" ", "\t")) for line in lines):  # code samples and tables are indented
                continue
            para = re.sub(r"\s+", " ", " ".join(line.strip() for line in lines)).strip()
            if len(para) < 80 or not para.endswith("."):
                continue
            if re.search(r"[{}<>|=]|\*\*|__|\d{4,}", para) or para in seen:
                continue
            seen.add(para)
            paragraphs.append(para)
    return paragraphs


def load_haystack() -> list[str]:
    if not HAYSTACK_FILE.exists():
        raise FileNotFoundError(f"{HAYSTACK_FILE} is missing; rebuild it with --refresh-haystack")
    paragraphs = [line.strip() for line in HAYSTACK_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(paragraphs) < 50:
        raise ValueError(f"{HAYSTACK_FILE} has only {len(paragraphs)} paragraphs")
    return paragraphs


def haystack_paragraphs(rng: random.Random, paragraphs: list[str], chars: int) -> list[str]:
    """Paragraphs in a random order (no paragraph twice until all were used) until ``chars`` are filled."""
    out: list[str] = []
    total = 0
    order: list[int] = []
    while total < chars:
        if not order:
            order = list(range(len(paragraphs)))
            rng.shuffle(order)
        para = paragraphs[order.pop()]
        out.append(para)
        total += len(para) + 1
    if out and total > chars:  # trim the last paragraph at a sentence (or word) boundary
        keep = len(out[-1]) - (total - chars)
        cut = out[-1][:keep]
        sentence_end = cut.rfind(". ")
        out[-1] = cut[: sentence_end + 1] if sentence_end > 0 else cut.rsplit(" ", 1)[0] + "."
    return out


def insert_needles(rng: random.Random, paragraphs: list[str], needles: list[str], ordered: bool = False) -> str:
    """Put each needle between paragraphs at a random depth (in order if ``ordered``) and join."""
    slots = sorted(rng.sample(range(len(paragraphs) + 1), k=min(len(needles), len(paragraphs) + 1)))
    if len(slots) < len(needles):
        slots += [len(paragraphs)] * (len(needles) - len(slots))
    if not ordered:
        needles = list(needles)
        rng.shuffle(needles)
    pieces = list(paragraphs)
    for offset, (slot, needle) in enumerate(zip(slots, needles)):
        pieces.insert(slot + offset, needle)
    return "\n".join(pieces)


# ------------------------------------------------------------------------------------------------ values


def number(rng: random.Random, digits: int, used: set[str]) -> str:
    while True:
        value = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
        if value not in used and not any(value in u or u in value for u in used):
            used.add(value)
            return value


def magic_key(rng: random.Random, used: set[str]) -> str:
    while True:
        key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        if key not in used:
            used.add(key)
            return key


def var_name(rng: random.Random, used: set[str]) -> str:
    while True:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in used:
            used.add(name)
            return name


def budget_chars(length: int, kind: str = "prose") -> int:
    return int(length * FILL * CHARS_PER_TOKEN[kind])


# ------------------------------------------------------------------------------------------------- tasks


def sample(body: str, question: str, prefix: str, answers: list[str]) -> dict:
    """A row: ``input`` (instructions, context and question; the user turn under a chat template),
    ``gen_prefix`` (the start of the answer; lm-eval appends it, after the assistant tag with a chat
    template) and ``outputs`` (the answers)."""
    return {"input": f"{body}\n\n{question}", "gen_prefix": prefix, "outputs": answers}


def make_passkey(rng: random.Random, hay: list[str], length: int) -> dict:
    head = (
        "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the pass key.\n\n"
    )
    code = number(rng, 7, set())
    needle = f"The secret pass key is {code}. Remember it."
    question, prefix = "What is the secret pass key mentioned in the text?", "The secret pass key is"
    tail = "\n\n" + question + " " + prefix
    paragraphs = haystack_paragraphs(rng, hay, budget_chars(length) - len(head) - len(tail) - len(needle))
    return sample(head + insert_needles(rng, paragraphs, [needle]), question, prefix, [code])


def make_multikey(rng: random.Random, hay: list[str], length: int, keys: int = 4) -> dict:
    head = (
        "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
        "I will quiz you about one of them afterwards.\n\n"
    )
    used_keys: set[str] = set()
    used_values: set[str] = set()
    pairs = [(magic_key(rng, used_keys), number(rng, 7, used_values)) for _ in range(keys)]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in pairs]
    key, value = pairs[0]
    question = f"What is the special magic number for {key} mentioned in the provided text?"
    prefix = f"The special magic number for {key} is:"
    tail = "\n\n" + question + " " + prefix
    chars = budget_chars(length) - len(head) - len(tail) - sum(map(len, needles))
    context = insert_needles(rng, haystack_paragraphs(rng, hay, chars), needles)
    return sample(head + context, question, prefix, [value])


def make_multivalue(rng: random.Random, hay: list[str], length: int, values: int = 4) -> dict:
    head = (
        "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
        "I will quiz you about them afterwards.\n\n"
    )
    key = magic_key(rng, set())
    used: set[str] = set()
    vals = [number(rng, 7, used) for _ in range(values)]
    needles = [f"One of the special magic numbers for {key} is: {v}." for v in vals]
    question = f"What are all the special magic numbers for {key} mentioned in the provided text? List all {values}, separated by commas."
    prefix = f"The special magic numbers for {key} are:"
    tail = "\n\n" + question + " " + prefix
    chars = budget_chars(length) - len(head) - len(tail) - sum(map(len, needles))
    context = insert_needles(rng, haystack_paragraphs(rng, hay, chars), needles)
    return sample(head + context, question, prefix, vals)


def make_vartrack(rng: random.Random, hay: list[str], length: int, hops: int = 4, chains: int = 2) -> dict:
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    names: set[str] = set()
    values: set[str] = set()
    all_chains = []
    for _ in range(chains):
        chain = [var_name(rng, names) for _ in range(hops + 1)]
        value = number(rng, 5, values)
        statements = [f"VAR {chain[0]} = {value}."] + [f"VAR {chain[i]} = VAR {chain[i - 1]}." for i in range(1, hops + 1)]
        all_chains.append((chain, value, statements))
    target_chain, target_value, _ = all_chains[0]
    question = f"Question: Find all variables that are assigned the value {target_value} in the text above."
    prefix = (
        f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables are "
        f"assigned the value {target_value}, they are:"
    )
    tail = "\n\n" + question + " " + prefix
    # interleave the chains, each one in order
    order = [c for c in range(chains) for _ in range(hops + 1)]
    rng.shuffle(order)
    cursors = [0] * chains
    needles = []
    for c in order:
        needles.append(all_chains[c][2][cursors[c]])
        cursors[c] += 1
    chars = budget_chars(length) - len(head) - len(tail) - sum(map(len, needles))
    context = insert_needles(rng, haystack_paragraphs(rng, hay, chars), needles, ordered=True)
    return {**sample(head + context, question, prefix, target_chain), "value": target_value}


def make_freqword(rng: random.Random, hay: list[str], length: int, top: int = 3) -> dict:
    head = (
        "Read the following coded text and track the frequency of each coded word. "
        "Find the three most frequently appeared coded words.\n\n"
    )
    question = (
        "Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
        "frequently appeared words in the above coded text?"
    )
    prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
    tail = "\n\n" + question + " " + prefix
    chars = budget_chars(length, "coded") - len(head) - len(tail)
    n_words = max(60, chars // 6)  # a coded word is ~5 characters plus a space
    vocab_size = max(30, n_words // 4)
    vocab: list[str] = []
    seen: set[str] = set()
    while len(vocab) < vocab_size:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5)))
        if word not in seen:
            seen.add(word)
            vocab.append(word)
    # Zipf counts (rank^-1) scaled to the length; the top ``top`` words lead every other word strictly.
    raw = [1.0 / (rank + 1) for rank in range(vocab_size)]
    counts = [max(1, int(n_words * r / sum(raw))) for r in raw]
    for rank in range(top, vocab_size):
        counts[rank] = min(counts[rank], counts[top - 1] - 1)
    if counts[top - 1] <= max(counts[top:]) or len(set(counts[:top])) < 1:
        raise RuntimeError("freqword: the top words are not separated; use a longer context")
    words = [w for w, c in zip(vocab, counts) for _ in range(c)]
    rng.shuffle(words)
    ranking = sorted(zip(vocab, counts), key=lambda kv: (-kv[1], kv[0]))
    text = " ".join(w if i % 20 else "...." + " " + w for i, w in enumerate(words))
    return sample(head + text, question, prefix, [w for w, _ in ranking[:top]])


def make_qa(rng: random.Random, hay: list[str], length: int) -> dict:
    head = (
        "Read the following document. It mixes general text with short biographies of several people. "
        "Answer the question about one of them.\n\n"
    )
    people = min(20, max(4, length // 400))  # at most 20: last names and professions stay unique
    names: set[str] = set()
    towns: set[str] = set()
    professions = rng.sample(_PROFESSIONS, k=min(people, len(_PROFESSIONS)))
    years: set[str] = set()
    records = []
    for i in range(people):
        while True:
            name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
            if name not in names and all(name.split()[1] not in n for n in names):
                names.add(name)
                break
        while True:
            town = rng.choice(_TOWN_START) + rng.choice(_TOWN_END)
            if town not in towns:
                towns.add(town)
                break
        year = str(rng.choice([y for y in range(1801, 1900) if str(y) not in years]))
        years.add(year)
        profession = professions[i % len(professions)]
        records.append({"name": name, "town": town, "year": year, "profession": profession if i < len(professions) else None})
    needles = []
    for r in records:
        job = f" and worked as a {r['profession']}" if r["profession"] else ""
        needles.append(f"{r['name']} was born in the town of {r['town']} in the year {r['year']}{job}.")
    target = records[0]
    kind = rng.choice(["town", "year", "profession"])
    question = {
        "town": (f"In which town was {target['name']} born?", f"{target['name']} was born in the town of"),
        "year": (f"In which year was {target['name']} born?", f"{target['name']} was born in the year"),
        "profession": (f"What did {target['name']} work as?", f"{target['name']} worked as a"),
    }[kind]
    tail = f"\n\nQuestion: {question[0]} {question[1]}"
    chars = budget_chars(length) - len(head) - len(tail) - sum(map(len, needles))
    context = insert_needles(rng, haystack_paragraphs(rng, hay, chars), needles)
    return {**sample(head + context, f"Question: {question[0]}", question[1], [target[kind]]), "question": kind}


MAKERS = {
    "passkey": make_passkey,
    "multikey": make_multikey,
    "multivalue": make_multivalue,
    "vartrack": make_vartrack,
    "freqword": make_freqword,
    "qa": make_qa,
}


def check_sample(task: str, sample: dict) -> None:
    """Raise if an answer is missing from its context or ambiguous (see the module docstring)."""
    text = sample["input"].lower()
    if task == "vartrack":
        for name in sample["outputs"]:
            if text.count(f"var {name.lower()} =") != 1:
                raise AssertionError(f"vartrack: variable {name} is assigned {text.count(f'var {name.lower()} =')} times")
        assigned = text.count(f"= {sample['value']}.")
        if assigned != 1:  # its one assignment (the question repeats the value)
            raise AssertionError(f"vartrack: value {sample['value']} is assigned {assigned} times")
        return
    if task == "freqword":
        words = re.findall(r"[a-z]+", text[text.index("words.\n\n") + 8 : text.rindex("\n\nquestion:")])
        tally: dict[str, int] = {}
        for w in words:
            tally[w] = tally.get(w, 0) + 1
        top = sorted(tally.values(), reverse=True)
        answers = [tally.get(a, 0) for a in sample["outputs"]]
        if sorted(answers, reverse=True) != top[: len(answers)] or top[len(answers) - 1] <= top[len(answers)]:
            raise AssertionError("freqword: answers are not the strict top words")
        return
    for answer in sample["outputs"]:
        n = text.count(answer.lower())
        if n != 1:
            raise AssertionError(f"{task}: answer {answer!r} occurs {n} times in its context")


def generate_task(task: str, length: int, samples: int, seed: int, hay: list[str]) -> list[dict]:
    rows = []
    for index in range(samples):
        attempt = 0
        while True:  # a draw that breaks an invariant (rare) is redrawn with the next attempt's seed
            rng = random.Random(f"kvlong-{seed}-{task}-{length}-{index}-{attempt}")
            sample = MAKERS[task](rng, hay, length)
            try:
                check_sample(task, sample)
                break
            except AssertionError:
                attempt += 1
                if attempt > 20:
                    raise
        rows.append({"task": task, "length": length, "index": index, **sample})
    return rows


# -------------------------------------------------------------------------------------------------- YAML


def length_tag(length: int) -> str:
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)


def task_name(task: str, length: int) -> str:
    return f"kvlong_{task}_{length_tag(length)}"


def task_yaml(task: str, length: int) -> str:
    name = task_name(task, length)
    return f"""# Generated by eval/tasks/generate.py; do not edit by hand.
task: {name}
tag:
  - kvlong_tasks
dataset_path: ""
dataset_name: ""
custom_dataset: !function utils.load_kvlong
dataset_kwargs:
  data_file: {task}_{length_tag(length)}.jsonl
output_type: generate_until
test_split: test
doc_to_text: "{{{{input}}}}"
gen_prefix: "{{{{gen_prefix}}}}"
doc_to_target: "{{{{outputs}}}}"
target_delimiter: " "
process_results: !function utils.process_results
metric_list:
  - metric: score
    aggregation: mean
    higher_is_better: true
generation_kwargs:
  do_sample: false
  max_gen_toks: {MAX_GEN_TOKS[task]}
  until:
    - "\\n\\n"
repeats: 1
metadata:
  version: 1.0
  length: {length}
"""


def group_yaml(group: str, tasks: list[str]) -> str:
    items = "\n".join(f"  - {t}" for t in tasks)
    return f"""# Generated by eval/tasks/generate.py; do not edit by hand.
group: {group}
task:
{items}
aggregate_metric_list:
  - metric: score
    aggregation: mean
    weight_by_size: false
metadata:
  version: 1.0
"""


def write_suite(out: Path, lengths: list[int], samples: int, seed: int, hay: list[str], progress: bool = True) -> list[Path]:
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    jobs = [(t, n) for n in lengths for t in TASKS]
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(jobs), desc="kvlong", unit="file")
        except ImportError:
            pass
    for task, length in jobs:
        rows = generate_task(task, length, samples, seed, hay)
        path = data / f"{task}_{length_tag(length)}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
        yaml_path = out / f"{task_name(task, length)}.yaml"
        yaml_path.write_text(task_yaml(task, length), encoding="utf-8")
        written += [path, yaml_path]
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    for length in lengths:
        path = out / f"kvlong_{length_tag(length)}.yaml"
        path.write_text(group_yaml(f"kvlong_{length_tag(length)}", [task_name(t, length) for t in TASKS]), encoding="utf-8")
        written.append(path)
    ci = [n for n in lengths if n in CI_LENGTHS] or list(lengths)
    path = out / "kvlong.yaml"
    path.write_text(group_yaml("kvlong", [task_name(t, n) for n in ci for t in TASKS]), encoding="utf-8")
    written.append(path)
    return written


def report_tokens(out: Path, tokenizer_dir: str) -> dict[str, dict[str, float]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    table: dict[str, dict[str, float]] = {}
    for path in sorted((out / "data").glob("*.jsonl")):
        lens = [len(tok(json.loads(line)["input"]).input_ids) for line in path.read_text(encoding="utf-8").splitlines()]
        table[path.stem] = {"min": min(lens), "mean": sum(lens) / len(lens), "max": max(lens)}
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvcache.eval.tasks.generate", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=TASKS_DIR, help="output folder (default: eval/tasks)")
    p.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="nominal lengths in tokens")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="samples per task and length")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--refresh-haystack", action="store_true", help="rebuild data/haystack_python_docs.txt from this Python")
    p.add_argument("--report-tokens", metavar="TOKENIZER_DIR", help="print real token counts of the written files")
    args = p.parse_args(argv)
    if args.samples < 1 or any(n < 512 for n in args.lengths):
        p.error("--samples must be >= 1 and every length >= 512 tokens")
    if args.refresh_haystack:
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        paragraphs = extract_haystack_from_python_docs()
        HAYSTACK_FILE.write_text("\n".join(paragraphs) + "\n", encoding="utf-8")
        print(f"wrote {len(paragraphs)} paragraphs to {HAYSTACK_FILE}")
    written = write_suite(args.out, sorted(set(args.lengths)), args.samples, args.seed, load_haystack())
    print(f"wrote {len(written)} files under {args.out}")
    if args.report_tokens:
        print(json.dumps(report_tokens(args.out, args.report_tokens), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
