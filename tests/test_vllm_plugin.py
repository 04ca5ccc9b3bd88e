"""The plugin's hooks into vLLM's argument parsing and configuration (no engine started)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402

from kvcache.engine_adapters.vllm import plugin  # noqa: E402
from kvcache.engine_adapters.vllm.config import KVPluginError  # noqa: E402


def test_entry_point_is_registered():
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert names.get("kvcache") == "kvcache.engine_adapters.vllm:register"


def test_flags_reach_vllms_parser_and_fold_into_additional_config():
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())  # loads the plugins, as `vllm serve` does
    args = parser.parse_args([
        "--model", "m", "--kv-policy", "keyformer", "--kv-budget", "0.5", "--kv-window", "16",
        "--additional-config", '{"kv_recompact_every": 4, "other": true}',
    ])
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.additional_config == {
        "kv_policy": "keyformer", "kv_budget": "0.5", "kv_window": "16", "kv_recompact_every": 4, "other": True,
    }
    help_text = parser.format_help()
    for flag in ("--kv-policy", "--kv-budget", "--kv-window", "--kv-layer-budget", "--kv-quant"):
        assert flag in help_text


def test_inert_without_policy():
    engine_args = EngineArgs(model="m", additional_config={"unrelated": 1})
    assert plugin.prepare_engine_args(engine_args) is None
    assert engine_args.scheduler_cls is None and engine_args.enable_prefix_caching is None


@pytest.mark.parametrize("prefix_caching", [None, True, False])
def test_policy_installs_scheduler_and_keeps_prefix_caching(prefix_caching):
    engine_args = EngineArgs(model="m", enforce_eager=True, enable_prefix_caching=prefix_caching,
                             additional_config={"kv_policy": "snapkv", "kv_budget": 0.25})
    cfg = plugin.prepare_engine_args(engine_args)
    assert cfg.policy_name == "snapkv" and cfg.budget == 0.25
    assert engine_args.scheduler_cls == plugin.SCHEDULER_CLS
    assert engine_args.enable_prefix_caching is prefix_caching and engine_args.async_scheduling is False


@pytest.mark.parametrize("kwargs,message", [
    ({"async_scheduling": True}, "async scheduling"),
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}}, "speculative decoding"),
    ({"kv_cache_dtype": "fp8"}, "kv-cache-dtype"),
    ({"pipeline_parallel_size": 2, "additional_config": {"kv_policy": "snapkv", "kv_chunk_evict": True}},
     "--kv-chunk-evict true with pipeline parallelism"),
    ({"decode_context_parallel_size": 2}, "context parallelism"),
    ({"enforce_eager": False, "_kvcache_eager_refused": True}, "--no-enforce-eager"),
    ({"scheduler_cls": "my.Scheduler"}, "--scheduler-cls"),
])
def test_fences_fail_at_launch_with_the_fix(kwargs, message):
    base = {"model": "m", "enforce_eager": True, "additional_config": {"kv_policy": "snapkv"}}
    explicit = {k: v for k, v in kwargs.items() if k.startswith("_")}
    engine_args = EngineArgs(**{**base, **{k: v for k, v in kwargs.items() if k not in explicit}})
    for name, value in explicit.items():
        setattr(engine_args, name, value)
    with pytest.raises(KVPluginError, match="cannot run with") as err:
        plugin.prepare_engine_args(engine_args)
    assert message in str(err.value)


def test_pipeline_and_data_parallelism_are_accepted_with_prompts_compacted_at_their_end():
    engine_args = EngineArgs(model="m", enforce_eager=True, pipeline_parallel_size=2, data_parallel_size=2,
                             additional_config={"kv_policy": "snapkv"})
    cfg = plugin.prepare_engine_args(engine_args)
    assert cfg.chunk_evict is False and engine_args.additional_config["kv_chunk_evict"] is False
    one_stage = EngineArgs(model="m", enforce_eager=True, additional_config={"kv_policy": "snapkv"})
    assert plugin.prepare_engine_args(one_stage).chunk_evict is None  # auto


def test_tensor_parallelism_is_accepted():
    """Each rank holds a shard of the KV heads and follows the same plan (tests/test_vllm_parallel.py runs it)."""
    engine_args = EngineArgs(model="m", enforce_eager=True, tensor_parallel_size=2, additional_config={"kv_policy": "snapkv"})
    assert plugin.prepare_engine_args(engine_args).policy_name == "snapkv"


def test_eager_mode_is_turned_on_by_the_plugin(caplog):
    engine_args = EngineArgs(model="m", additional_config={"kv_policy": "snapkv"})  # vLLM's default: not eager
    with caplog.at_level("INFO", logger="vllm.kvcache"):
        plugin.prepare_engine_args(engine_args)
    assert engine_args.enforce_eager is True
    assert "eager mode turned on" in caplog.text
    stock = EngineArgs(model="m")
    plugin.prepare_engine_args(stock)  # inert: vLLM's own default stays
    assert stock.enforce_eager is False


def test_unsupported_vllm_version_refused_only_with_a_policy(monkeypatch):
    error = KVPluginError("the kvcache vLLM plugin supports vLLM >=0.32,<0.33 but vLLM 0.40.0 is installed")
    monkeypatch.setattr(plugin, "_version_error", error)
    assert plugin.prepare_engine_args(EngineArgs(model="m")) is None
    with pytest.raises(KVPluginError, match="supports vLLM"):
        plugin.prepare_engine_args(EngineArgs(model="m", enforce_eager=True, additional_config={"kv_policy": "h2o"}))


def test_layer_budget_refused_through_engine_args():
    engine_args = EngineArgs(model="m", enforce_eager=True, additional_config={"kv_policy": "snapkv", "kv_layer_budget": "cake"})
    with pytest.raises(KVPluginError, match="kvcache.engine_adapters.hf"):
        plugin.prepare_engine_args(engine_args)


def test_launcher_parses_vllm_serve_arguments():
    from kvcache.engine_adapters.vllm.launcher import parse_serve_args

    args, _ = parse_serve_args(["/some/model", "--kv-policy", "snapkv", "--kv-budget", "0.25", "--port", "8123"])
    assert args.model_tag == "/some/model" and args.port == 8123
    assert args.kv_policy == "snapkv" and args.kv_budget == "0.25"
    assert args.gpu_memory_utilization == 0.5  # CPU default of the launcher
    assert AsyncEngineArgs.from_cli_args(args).additional_config["kv_policy"] == "snapkv"


def test_gpu_is_fenced_with_implemented_but_not_yet_run():
    from types import SimpleNamespace

    model = SimpleNamespace(
        is_encoder_decoder=False, is_hybrid=False, has_inner_state=False, runner_type="generate",
        is_multimodal_model=False, get_sliding_window=lambda: None,
    )
    vllm_config = SimpleNamespace(
        model_config=model, device_config=SimpleNamespace(device_type="cuda"), use_v2_model_runner=False,
        scheduler_config=SimpleNamespace(async_scheduling=False), cache_config=SimpleNamespace(enable_prefix_caching=False),
    )
    with pytest.raises(KVPluginError, match="not yet been run on a GPU") as err:
        plugin.check_vllm_config(vllm_config)
    assert "tested on CPU tensors in the GPU backends' layouts" in str(err.value)
    vllm_config.device_config.device_type = "cpu"
    plugin.check_vllm_config(vllm_config)  # the CPU backend passes
