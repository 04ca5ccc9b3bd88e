"""The registry: listing, creation from plain configs, and clear errors."""

from __future__ import annotations

import json

import pytest

import kvcache
from kvcache.budget import parse_budget, tokens_for
from kvcache.cli import main
from kvcache.registry import PolicyConfigError


def test_every_kind_lists_its_members_with_defaults():
    listed = {(p["kind"], p["name"]) for p in kvcache.list_policies()}
    for name in ("full", "streaming", "h2o", "snapkv", "keyformer"):
        assert ("evict", name) in listed
    for name in ("uniform", "pyramid", "cake"):
        assert ("budget", name) in listed
    snapkv = next(p for p in kvcache.list_policies("evict") if p["name"] == "snapkv")
    defaults = {p["name"]: p["default"] for p in snapkv["parameters"]}
    assert defaults == {"window": 32, "kernel": 15, "pooling": "max", "sinks": 0}


def test_create_from_spec_string_coerces_types():
    policy = kvcache.create("evict", "keyformer:window=0.2,seed=3,tau_end=3")
    assert (policy.window, policy.seed, policy.tau_end) == (0.2, 3, 3.0)
    assert kvcache.create("evict", "keyformer:window=0.2:seed=3") == kvcache.create("evict", "keyformer:window=0.2,seed=3")
    assert kvcache.create("evict", {"name": "snapkv", "window": "8"}).window == 8


@pytest.mark.parametrize(
    "kind, spec, params, fragment",
    [
        ("evict", "snapk", {}, "valid evict policies: "),
        ("evict", "snapkv", {"windw": 3}, "valid parameters: kernel, pooling, sinks, window"),
        ("evict", "snapkv", {"kernel": 4}, "odd"),
        ("evict", "snapkv", {"pooling": "median"}, "must be one of 'max', 'avg'"),
        ("evict", "keyformer", {"window": 1.5}, "[0, 1)"),
        ("evict", "keyformer", {"tau_init": 0.0}, "> 0"),
        ("evict", "h2o", {"sinks": -1}, ">= 0"),
        ("budget", "pyramid", {"beta": 0.5}, ">= 1"),
        ("budget", "cak", {}, "valid budget policies: cake, pyramid, uniform"),
        ("nonsense", "x", {}, "valid kinds: evict, budget, quant, feature"),
        ("evict", "snapkv", {"window": "abc"}, "cannot read"),
    ],
)
def test_bad_configs_name_the_valid_choices(kind, spec, params, fragment):
    with pytest.raises(PolicyConfigError, match=None) as err:
        kvcache.create(kind, spec, **params)
    assert fragment in str(err.value)


@pytest.mark.parametrize("bad", [0, -3, 0.0, 1.5, -0.2, "abc", True])
def test_bad_budgets_are_refused(bad):
    with pytest.raises(PolicyConfigError):
        parse_budget(bad)


def test_budget_fraction_or_token_count():
    assert parse_budget("0.5") == 0.5 and parse_budget("512") == 512
    assert tokens_for(0.5, 101) == 51
    assert tokens_for(512, 100) == 100  # never more than the prompt
    assert tokens_for(1.0, 77) == 77


def test_cli_lists_policies_as_json(capsys):
    assert main(["policies", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {"kind", "name", "summary", "parameters"} <= set(listed[0])
    assert main(["policies", "--kind", "budget"]) == 0
    assert "pyramid" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["bench", "--quant", "zip"], "valid quant policies: kivi, none, zipcache"),
        (["sweep", "--policies", "h2o:kernel=4"], "h2o kernel must be odd"),
        (["sweep", "--quants", "kivi:bits=3"], "bits must be one of"),
    ],
)
def test_cli_bad_spec_is_a_clean_error(capsys, argv, fragment):
    """A bad policy or codec spec on any subcommand exits 2 with the registry's message, no traceback."""
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith(f"kvcache {argv[0]}:") and fragment in message
