"""The ``vllm.general_plugins`` entry point: argument flags, config checks and the engine seams.

vLLM calls :func:`register` in every process it starts (the API server, the engine core, each worker)
before it parses arguments. The plugin is inert unless ``additional_config`` carries ``kv_policy``:

* ``EngineArgs.add_cli_args`` gains ``--kv-policy/--kv-budget/--kv-window/--kv-layer-budget/--kv-quant``
  (plus ``--kv-recompact-every``, ``--kv-chunk-evict``, ``--kv-admission``, and the limits on per-request settings
  ``--kv-request-policies``, ``--kv-request-min-budget``); ``EngineArgs.from_cli_args`` folds them into
  ``additional_config``.
* The front end's ``InputProcessor.process_inputs`` checks a request's own ``kv_policy``/``kv_budget``/``kv_window``
  (``vllm_xargs``) against those limits and refuses what the plugin would serve wrongly, with a 400.
* ``EngineArgs.create_engine_config`` validates the settings, fences off what the plugin cannot handle
  (with the fix in the message) and installs the scheduler subclass
  :class:`kvcache.engine_adapters.vllm.scheduler.KVCacheScheduler`. vLLM's prefix caching stays as the user
  set it (on by default): the scheduler keeps shared blocks out of compactions.
* When vLLM's V1 model runner module is imported (in the worker process) its input preparation and
  step are wrapped (:mod:`kvcache.engine_adapters.vllm.worker`); patching happens lazily through an
  import hook so that processes that never run a model do not import the model runner. The attention
  backend the engine chose is wrapped when the worker first meets its layers (query capture), and its
  KV cache layout is learned from its own cache-write op.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import logging
import sys
from typing import Any, Callable

from kvcache.engine_adapters.vllm import config as kvconfig
from kvcache.engine_adapters.vllm.config import KVPluginError

logger = logging.getLogger("vllm.kvcache")  # under vLLM's handler once vLLM configured logging

SCHEDULER_CLS = "kvcache.engine_adapters.vllm.scheduler.KVCacheScheduler"

_registered = False
_version_error: KVPluginError | None = None


def register() -> None:
    """Entry point (``vllm.general_plugins``); safe to call more than once per process."""
    global _registered, _version_error
    if _registered:
        return
    _registered = True
    try:
        from vllm.version import __version__ as version

        kvconfig.check_vllm_version(version)
    except KVPluginError as err:
        # Keep vLLM usable without a policy; refuse only when a policy is asked for.
        _version_error = err
        logger.warning("kvcache: %s", err)
    _patch_engine_args()
    if _version_error is None:
        _install_import_hooks()


# --------------------------------------------------------------------------------------------------
# Arguments and configuration


def _int_or_auto(text: str) -> int | str:
    return text if text.strip().lower() == "auto" else int(text)


def add_kv_arguments(parser: Any) -> Any:
    """Add the ``--kv-*`` flags to a vLLM (argparse) parser; returns the parser."""
    if any("--kv-policy" in action.option_strings for action in parser._actions):
        return parser
    group = parser.add_argument_group(
        "kvcache", "KV-cache eviction (kvcache plugin); also settable in --additional-config as kv_policy, ..."
    )
    group.add_argument(
        "--kv-policy", dest="kv_policy", default=None,
        help="eviction policy: snapkv, keyformer, h2o, streaming, full, or 'name:key=value,...' "
        "(see `kvcache policies`). Unset: the plugin is inert.",
    )
    group.add_argument(
        "--kv-budget", dest="kv_budget", default=None,
        help="tokens kept per layer and KV head: a fraction of the prompt (0.25) or a token count (512)",
    )
    group.add_argument("--kv-window", dest="kv_window", default=None, help="recent window kept (overrides the policy's)")
    group.add_argument(
        "--kv-layer-budget", dest="kv_layer_budget", default=None,
        help="layer budget: only 'uniform' in vLLM (pyramid/cake work in the Hugging Face adapter)",
    )
    group.add_argument(
        "--kv-recompact-every", dest="kv_recompact_every", default=None, type=_int_or_auto,
        help="decode-time policies (keyformer, h2o, streaming): re-compact every k generated tokens (default auto: "
        "the room left in the last KV block the kept tokens occupy, when >= 4 tokens, else that room plus one block)",
    )
    group.add_argument(
        "--kv-chunk-evict", dest="kv_chunk_evict", default=None,
        help="compact after every prefill chunk: true, false or auto (default: only prompts longer than half the pool)",
    )
    group.add_argument(
        "--kv-admission", dest="kv_admission", default=None,
        help="reserve (default: admit a request only while the pool holds the running compressed requests' planned "
        "growth, so none is preempted) or optimistic (vLLM's own rule)",
    )
    group.add_argument("--kv-quant", dest="kv_quant", default=None, help="quantised KV (not supported in vLLM yet)")
    group.add_argument(
        "--kv-request-policies", dest="kv_request_policies", default=None,
        help="policies a request may choose for itself (vllm_xargs / SamplingParams.extra_args kv_policy, kv_budget, "
        "kv_window): comma-separated names, 'any' (default) or 'none' (no per-request settings)",
    )
    group.add_argument(
        "--kv-request-min-budget", dest="kv_request_min_budget", default=None,
        help="the smallest kv_budget a request may ask for (fraction or tokens; 1.0 always allowed); default: any",
    )
    return parser


def fold_namespace(additional_config: Any, args: Any) -> dict[str, Any]:
    values = {key: getattr(args, key, None) for key in kvconfig.KEYS}
    return kvconfig.fold_cli_args(additional_config, values)


def _patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs, "_kvcache_patched", False):
        return
    EngineArgs._kvcache_patched = True

    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.from_cli_args.__func__
    original_create = EngineArgs.create_engine_config

    @functools.wraps(original_add)
    def add_cli_args(parser, *args, **kwargs):
        parser = original_add(parser, *args, **kwargs)
        return add_kv_arguments(parser)

    @functools.wraps(original_from)
    def from_cli_args(cls, args):
        engine_args = original_from(cls, args)
        folded = fold_namespace(engine_args.additional_config, args)
        if folded:
            engine_args.additional_config = folded
        if "--no-enforce-eager" in sys.argv:  # the only way to tell an explicit "no" from vLLM's default
            engine_args._kvcache_eager_refused = True
        return engine_args

    @functools.wraps(original_create)
    def create_engine_config(self, *args, **kwargs):
        cfg = prepare_engine_args(self)
        vllm_config = original_create(self, *args, **kwargs)
        if cfg is not None:
            check_vllm_config(vllm_config)
        return vllm_config

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
    EngineArgs.create_engine_config = create_engine_config


def prepare_engine_args(engine_args: Any) -> kvconfig.KVPluginConfig | None:
    """Check the kvcache settings on ``EngineArgs`` and set what the plugin needs; None when inert."""
    engine_args.additional_config = kvconfig.fold_cli_args(engine_args.additional_config, {})
    cfg = kvconfig.parse(engine_args.additional_config)
    if cfg is None:
        return None
    if _version_error is not None:
        raise _version_error
    problems = []
    if engine_args.async_scheduling:
        problems.append("async scheduling: the eviction barrier needs each step's output first; drop --async-scheduling")
    if engine_args.speculative_config:
        problems.append("speculative decoding: drop --speculative-config")
    if engine_args.kv_transfer_config is not None:
        problems.append("KV connectors (--kv-transfer-config): drop it")
    if getattr(engine_args, "kv_offloading_size", None):
        problems.append("KV offloading (--kv-offloading-size): drop it")
    if (engine_args.decode_context_parallel_size or 1) > 1 or (engine_args.prefill_context_parallel_size or 1) > 1:
        problems.append("context parallelism: use --decode-context-parallel-size 1 --prefill-context-parallel-size 1")
    if (engine_args.pipeline_parallel_size or 1) > 1 and cfg.chunk_evict:
        problems.append(
            "--kv-chunk-evict true with pipeline parallelism: vLLM sends a prompt's next chunk into the pipeline before "
            "the previous chunk's compaction is known, so prompts are compacted once, at their end; drop "
            "--kv-chunk-evict (or use -pp 1)"
        )
    if str(engine_args.kv_cache_dtype) not in ("auto",):
        problems.append(f"--kv-cache-dtype {engine_args.kv_cache_dtype}: only 'auto' is supported")
    if engine_args.scheduler_cls not in (None, SCHEDULER_CLS, "vllm.v1.core.sched.scheduler.Scheduler"):
        problems.append(f"--scheduler-cls {engine_args.scheduler_cls}: the plugin installs its own scheduler")
    if not engine_args.enforce_eager and getattr(engine_args, "_kvcache_eager_refused", False):
        problems.append(
            "--no-enforce-eager: the plugin reads queries inside the attention backend, which compiled graphs "
            "skip; drop --no-enforce-eager"
        )
    if problems:
        raise KVPluginError(
            f"kvcache --kv-policy {cfg.policy_name} cannot run with: " + "; ".join(problems)
        )
    if not engine_args.enforce_eager:
        logger.info("kvcache: eager mode turned on (--enforce-eager): the plugin reads queries inside the attention backend")
        engine_args.enforce_eager = True
    engine_args.async_scheduling = False
    engine_args.scheduler_cls = SCHEDULER_CLS
    if (engine_args.pipeline_parallel_size or 1) > 1 and cfg.chunk_evict is None:
        # With several stages vLLM keeps a batch per stage in flight and may schedule a prompt's next chunk
        # before the previous one's compaction frees its blocks: prompts are compacted once, at their end.
        engine_args.additional_config["kv_chunk_evict"] = False
        cfg = kvconfig.parse(engine_args.additional_config)
        logger.info("kvcache: pipeline parallelism: prompts are compacted once, at their end (kv_chunk_evict false)")
    return cfg


def check_vllm_config(vllm_config: Any) -> None:
    """Fences that need the resolved config (model type, runner)."""
    model_config = vllm_config.model_config
    problems = []
    if getattr(model_config, "is_encoder_decoder", False):
        problems.append("encoder-decoder models")
    if getattr(model_config, "is_hybrid", False) or getattr(model_config, "has_inner_state", False):
        problems.append("hybrid (attention + state-space) models")
    if model_config.get_sliding_window() is not None:
        problems.append("sliding-window attention models")
    if getattr(model_config, "runner_type", "generate") != "generate":
        problems.append(f"runner {model_config.runner_type!r} (only text generation)")
    if model_config.is_multimodal_model:
        problems.append("multimodal models")
    if vllm_config.device_config.device_type != "cpu":
        if getattr(vllm_config, "use_v2_model_runner", False):
            problems.append(
                "vLLM's V2 model runner (the GPU default in 0.32): set VLLM_USE_V2_MODEL_RUNNER=0 to use the V1 "
                "runner the plugin hooks into"
            )
        problems.append(
            f"device {vllm_config.device_config.device_type!r}: query capture and the KV cache layout are backend-"
            "independent (learned from the backend's own cache write) and tested on CPU tensors in the GPU backends' "
            "layouts, but the plugin has not yet been run on a GPU, so it is fenced off there; on GPU use the Hugging "
            "Face adapter (kvcache.engine_adapters.hf) for now"
        )
    if vllm_config.scheduler_config.async_scheduling:
        problems.append("async scheduling (pass --no-async-scheduling)")
    if problems:
        raise KVPluginError("kvcache --kv-policy does not support " + "; ".join(problems) + " yet")


# --------------------------------------------------------------------------------------------------
# Lazy patches of the worker-side modules


_HOOKS: dict[str, Callable[[Any], None]] = {}


def _patch_model_runner(module: Any) -> None:
    from kvcache.engine_adapters.vllm import worker

    worker.patch_model_runner(module.GPUModelRunner)


def _patch_kv_cache_utils(module: Any) -> None:
    """vLLM refuses to start when the pool cannot hold one request of ``max_model_len`` tokens. With
    eviction after every prefill chunk a request holds about budget + chunk tokens, so that is what must
    fit (this is what makes prompts longer than the pool servable)."""
    if getattr(module, "_kvcache_patched", False):
        return
    original_configs = module.get_kv_cache_configs
    original_check = module._check_enough_kv_cache_memory

    @functools.wraps(original_configs)
    def get_kv_cache_configs(vllm_config, *args, **kwargs):
        cfg = kvconfig.parse(vllm_config.additional_config)
        if cfg is None or cfg.chunk_evict is False or not cfg.create_policy().compresses:
            return original_configs(vllm_config, *args, **kwargs)
        max_len = vllm_config.model_config.max_model_len
        chunk = vllm_config.scheduler_config.max_num_batched_tokens
        capacity = cfg.create_plan().request(max_len).capacity
        block_size = vllm_config.cache_config.block_size
        peak = min(max_len, capacity + max(chunk, kvconfig.recompact_tokens(cfg, capacity, block_size)))

        def check(available, get_needed, max_model_len, estimate):
            return original_check(available, lambda: -(-get_needed() * peak // max_model_len), max_model_len, estimate)

        module._check_enough_kv_cache_memory = check
        try:
            return original_configs(vllm_config, *args, **kwargs)
        finally:
            module._check_enough_kv_cache_memory = original_check

    module.get_kv_cache_configs = get_kv_cache_configs
    module._kvcache_patched = True
    if "vllm.v1.engine.core" in sys.modules:
        _repoint_engine_core(sys.modules["vllm.v1.engine.core"])


def _patch_input_processor(module: Any) -> None:
    """The front end's request check (``InputProcessor.process_inputs``, where vLLM refuses a prompt longer than
    ``max_model_len`` with a 400): a request's own kv settings (``vllm_xargs`` / ``SamplingParams.extra_args``)
    are checked against the server's limits, and a request the plugin would serve wrongly is refused (prompt
    logprobs of a prompt the pool cannot hold whole; :meth:`Planner.prompt_logprobs_refusal`)."""
    cls = module.InputProcessor
    if getattr(cls, "_kvcache_patched", False):
        return
    original = cls.process_inputs

    @functools.wraps(original)
    def process_inputs(self, *args, **kwargs):
        request = original(self, *args, **kwargs)
        params = getattr(request, "sampling_params", None)
        if params is not None:
            problem = request_problem(self.vllm_config, params, len(request.prompt_token_ids or ()))
            if problem is not None:
                from vllm.exceptions import VLLMValidationError

                raise VLLMValidationError(problem)
        return request

    cls.process_inputs = process_inputs
    cls._kvcache_patched = True


def request_problem(vllm_config: Any, params: Any, prompt_len: int) -> str | None:
    """Why the plugin refuses a request (its message, for a 400), or None."""
    try:
        overrides = kvconfig.request_overrides(params.extra_args)
    except KVPluginError as err:
        return str(err)
    wants_logprobs = params.prompt_logprobs is not None
    if not overrides and not wants_logprobs:
        return None
    server = _server_config(vllm_config)
    if server is None:
        if overrides:
            return (
                f"per-request kv settings ({', '.join(k for k, _ in overrides)}) need a server started with "
                "--kv-policy; drop them, or start the server with a policy"
            )
        return None
    try:
        server.check_request(server.for_request(overrides), prompt_len)
    except KVPluginError as err:
        return str(err)
    if wants_logprobs:
        planner = _front_end_planner(vllm_config, server)
        return planner.prompt_logprobs_refusal(prompt_len) if planner is not None else None
    return None


_SERVER_CONFIGS: dict[str, Any] = {}
_FRONT_END_PLANNERS: dict[tuple, Any] = {}


def _server_config(vllm_config: Any) -> kvconfig.KVPluginConfig | None:
    """The server's parsed settings (cached by their text: the front end checks every request)."""
    key = repr(sorted((vllm_config.additional_config or {}).items(), key=lambda item: str(item[0])))
    if key not in _SERVER_CONFIGS:
        _SERVER_CONFIGS[key] = kvconfig.parse(vllm_config.additional_config)
    return _SERVER_CONFIGS[key]


def _front_end_planner(vllm_config: Any, cfg: kvconfig.KVPluginConfig) -> Any:
    """The plan's rules in the front-end process, with the KV pool's size once the engine reported it (None:
    the pool not known yet)."""
    blocks = vllm_config.cache_config.num_gpu_blocks
    if not blocks:
        return None
    # with data parallelism the front end holds the sum over its engines; each engine has its own pool
    blocks //= max(1, getattr(vllm_config.parallel_config, "data_parallel_size", 1) or 1)
    from kvcache.engine_adapters.vllm.plan import Planner

    block_size = vllm_config.cache_config.block_size
    key = (id(cfg), blocks, block_size)
    if key not in _FRONT_END_PLANNERS:
        _FRONT_END_PLANNERS[key] = Planner(cfg, (blocks - 1) * block_size, block_size)
    return _FRONT_END_PLANNERS[key]


def _repoint_engine_core(module: Any) -> None:
    """``vllm.v1.engine.core`` imports ``get_kv_cache_configs`` by name; point it at the patched one."""
    utils = sys.modules.get("vllm.v1.core.kv_cache_utils")
    if utils is not None and getattr(utils, "_kvcache_patched", False):
        module.get_kv_cache_configs = utils.get_kv_cache_configs


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, hook: Callable[[Any], None]) -> None:
        self._loader = loader
        self._hook = hook

    def create_module(self, spec):  # noqa: D401
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._hook(module)


class _PatchingFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        hook = _HOOKS.get(fullname)
        if hook is None:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, hook)
                return spec
        return None


def _install_import_hooks() -> None:
    _HOOKS["vllm.v1.worker.gpu_model_runner"] = _patch_model_runner
    _HOOKS["vllm.v1.core.kv_cache_utils"] = _patch_kv_cache_utils
    _HOOKS["vllm.v1.engine.core"] = _repoint_engine_core
    _HOOKS["vllm.v1.engine.input_processor"] = _patch_input_processor
    for name, hook in _HOOKS.items():
        if name in sys.modules:
            hook(sys.modules[name])
    if not any(isinstance(f, _PatchingFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchingFinder())
