"""The lm-eval model ``kvcache``: budget 1.0 scores what lm-eval's stock ``hf`` model scores; compression
reaches loglikelihood; bad ``model_args`` fail with a clear message."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
import torch  # noqa: E402

from kvcache.eval import lm_eval_model  # noqa: E402
from kvcache.eval.lm_eval_model import KVCacheLM, KVModelArgsError, split_kv_args  # noqa: E402

TASKS_DIR = Path(lm_eval_model.__file__).resolve().parent / "tasks"

MC_DATA = '''
import datasets

FACTS = [("Ada Blackwood", "Belgate", "glassblower"), ("Bram Corrigan", "Kesholm", "beekeeper"),
         ("Cora Draycott", "Wickmere", "cartographer"), ("Edda Ellery", "Fenford", "clockmaker"),
         ("Faro Grimsby", "Oakness", "bookbinder"), ("Greta Hartwell", "Rosdale", "shipwright")]
FILLER = ("The town archive keeps records of births, trades and travels. Many entries are short, some are long, "
          "and a few mention people who moved away. ")


def load(**_):
    rows = []
    for i, (name, town, job) in enumerate(FACTS):
        story = " ".join(f"{n} was born in {t} and worked as a {j}. {FILLER * 2}" for n, t, j in FACTS[i:] + FACTS[:i])
        choices = [t for _, t, _ in FACTS]
        rows.append({"question": f"{story}\\nQuestion: Where was {name} born?\\nAnswer:", "choices": choices, "label": i})
    return {"test": datasets.Dataset.from_list(rows)}
'''

MC_YAML = """
task: kv_mc_smoke
dataset_path: ""
custom_dataset: !function mcdata.load
output_type: multiple_choice
test_split: test
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A random 2-layer Llama (GQA) saved with the embedded model's tokenizer."""
    import transformers as tf

    from kvcache.engine_adapters.hf import resolve_model

    folder = tmp_path_factory.mktemp("tiny_llama")
    source = resolve_model("smollm2-135m")
    tok = tf.AutoTokenizer.from_pretrained(source)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    tf.LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "mcdata.py").write_text(MC_DATA)
    (folder / "kv_mc_smoke.yaml").write_text(textwrap.dedent(MC_YAML))
    for name in ("kvlong_passkey_1k.yaml", "utils.py"):
        shutil.copy(TASKS_DIR / name, folder / name)
    (folder / "data").symlink_to(TASKS_DIR / "data")
    return folder


def _evaluate(lm, tasks: list[str], task_dir: Path, limit: int) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(task_dir)), limit=limit,
        log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
    )


def _responses(out: dict, task: str) -> list:
    return [s["filtered_resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


def test_budget_one_scores_exactly_like_stock_hf(tiny_folder, task_dir):
    from lm_eval.models.huggingface import HFLM

    tasks = ["kv_mc_smoke", "kvlong_passkey_1k"]
    stock = _evaluate(HFLM(pretrained=str(tiny_folder), device="cpu", dtype="float32", batch_size=3), tasks, task_dir, 4)
    kv = KVCacheLM(pretrained=str(tiny_folder), device="cpu", batch_size=3, kv_policy="snapkv", kv_budget=1.0)
    try:
        ours = _evaluate(kv, tasks, task_dir, 4)
    finally:
        kv.close()
    assert ours["results"]["kv_mc_smoke"]["acc,none"] == stock["results"]["kv_mc_smoke"]["acc,none"]
    assert ours["results"]["kvlong_passkey_1k"]["score,none"] == stock["results"]["kvlong_passkey_1k"]["score,none"]
    assert _responses(ours, "kvlong_passkey_1k") == _responses(stock, "kvlong_passkey_1k")  # same generated text
    for a, b in zip(_responses(ours, "kv_mc_smoke"), _responses(stock, "kv_mc_smoke")):
        assert [round(x[0], 3) for x in a] == pytest.approx([round(x[0], 3) for x in b], abs=2e-3)
    assert kv.kv_stats and all(s["kv_bytes"] > 0 for s in kv.kv_stats)


def test_compression_reaches_loglikelihood(tiny_folder):
    from lm_eval.api.instance import Instance

    def loglik(lm):
        text = " ".join(f"record {i} says the value is {i * 7 % 13}." for i in range(60))
        reqs = [Instance("loglikelihood", {}, (text, " the value is 5."), i) for i in range(2)]
        return [x[0] for x in lm.loglikelihood(reqs)]

    full = KVCacheLM(pretrained=str(tiny_folder), device="cpu", batch_size=2, kv_policy="full")
    small = KVCacheLM(pretrained=str(tiny_folder), device="cpu", batch_size=2, kv_policy="streaming", kv_budget=0.1)
    try:
        a, b = loglik(full), loglik(small)
        kept = small.kv_stats[-1]["kept_tokens_per_layer"]
    finally:
        full.close()
        small.close()
    assert a[0] == pytest.approx(a[1], abs=1e-4)  # the batch rows agree
    assert abs(a[0] - b[0]) > 1e-3  # the policy changed the score
    assert max(max(k) if isinstance(k, list) else k for k in kept) < 100


@pytest.mark.parametrize(
    "args, message",
    [
        ({"kv_policy": "keyformr"}, "unknown kv_policy 'keyformr'; valid:"),
        ({"kv_budget": 1.5}, "must be in (0, 1]"),
        ({"kv_budget": "half"}, "neither a fraction like 0.5 nor a token count"),
        ({"kv_budget": 0}, "token count must be >= 1"),
        ({"kv_layer_budget": "pyramidal"}, "unknown kv_layer_budget 'pyramidal'; valid:"),
        ({"kv_policy": "keyformer", "kv_windw": 0.2}, "windw"),
        ({"kv_policy": "keyformer", "kv_tau_init": -1}, "tau_init must be a number > 0"),
        ({"kv_quant": "int3"}, "unknown kv_quant 'int3'"),
        ({"kv_quant": "kivi:bits=3"}, "bits"),
        ({"kv_ll_chunk": 0}, "kv_ll_chunk must be an int >= 1"),
    ],
)
def test_bad_model_args_give_a_clear_error(args, message):
    with pytest.raises(KVModelArgsError) as err:
        split_kv_args(args)
    assert message in str(err.value)


def test_good_model_args_split():
    kv, rest = split_kv_args({"kv_policy": "keyformer", "kv_budget": "0.25", "kv_window": "0.2", "batch_size": 4})
    assert rest == {"batch_size": 4}
    assert kv["settings"] == {"policy": "keyformer", "budget": 0.25, "layer_budget": "uniform", "attention": "sdpa", "window": "0.2"}
    assert split_kv_args({"kv_budget": "512", "kv_policy": "snapkv"})[0]["settings"]["budget"] == 512
    # a codec spec, parameters after ':' since ',' separates model_args
    assert split_kv_args({"kv_quant": "kivi:bits=4:group_size=16"})[0]["settings"]["quant"] == "kivi:bits=4:group_size=16"


def test_unknown_model_is_a_clear_error():
    with pytest.raises(KVModelArgsError, match="never downloads"):
        KVCacheLM(pretrained="no/such-model", kv_policy="snapkv")


def test_cli_forwards_to_lm_eval(capsys, tmp_path):
    from kvcache.eval.lm_eval_cli import TASKS_DIR as cli_tasks
    from kvcache.eval.lm_eval_cli import include_paths, lm_eval_argv

    assert lm_eval_argv(["--model", "kvcache", "--tasks", "kvlong"]) == ["run", "--model", "kvcache", "--tasks", "kvlong"]
    assert include_paths(None) == [str(cli_tasks)]
    other = tmp_path / "more"
    other.mkdir()
    assert include_paths(str(tmp_path)) == [str(tmp_path), str(cli_tasks)]
    assert include_paths(f"{tmp_path}:{other}") == [str(tmp_path), str(other), str(cli_tasks)]
    from kvcache.cli import main

    assert main(["eval", "--help"]) == 0
    assert "--model_args" in capsys.readouterr().out


def test_cli_runs_a_users_task_beside_the_shipped_ones(tiny_folder, tmp_path, capsys):
    """``kvcache eval --include_path DIR`` keeps the user's folder and adds kvlong's (lm-eval 0.4.13 does not
    split a ``:``-joined path, so joining them lost the user's tasks)."""
    import json

    from kvcache.cli import main

    user_tasks = tmp_path / "my_tasks"
    user_tasks.mkdir()
    (user_tasks / "mcdata.py").write_text(MC_DATA)
    (user_tasks / "kv_mc_smoke.yaml").write_text(textwrap.dedent(MC_YAML))
    out_dir = tmp_path / "out"
    code = main([
        "eval", "--model", "kvcache", "--model_args", f"pretrained={tiny_folder},kv_policy=snapkv,kv_budget=0.5",
        "--tasks", "kv_mc_smoke,kvlong_passkey_1k", "--include_path", str(user_tasks), "--limit", "2",
        "--batch_size", "2", "--output_path", str(out_dir),
    ])
    assert code == 0
    results = [json.loads(p.read_text()) for p in out_dir.rglob("results_*.json")]
    assert results and {"kv_mc_smoke", "kvlong_passkey_1k"} <= set(results[0]["results"])


def test_cli_names_a_missing_include_path(tmp_path, capsys):
    from kvcache.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", "kvcache", "--tasks", "x", "--include_path", str(tmp_path / "nope")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and "Traceback" not in err
