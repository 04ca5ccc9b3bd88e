"""``kvcache bench dit``: DiT feature-cache policies side by side on the trained digits DiT.

For each policy and setting: wall-clock speedup and fraction of block computations skipped against the
uncached run in the same process, and PSNR / SSIM / MSE of the images against the uncached images from
the same seed. diffusers' own ``FirstBlockCacheConfig`` (and ``cache-dit``'s DBCache when it is installed
and accepts the model) run on the same model in the same run. Writes JSON and a PNG of PSNR vs speedup
(one curve per method), with the machine and its load.

Timing (:mod:`kvcache.eval.harness`): per configuration, ``--repeats`` rounds of an uncached run and a cached
run, alternating; ``seconds`` and ``uncached_seconds`` are the medians (with ``_min``, ``_max``, ``_iqr``),
``speedup`` the ratio of the medians and ``speedup_best`` that of the fastest runs.

Block computations are counted independently of the policies: a forward pre-hook on each block's first
attention module fires only when the block really runs.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from kvcache.eval import harness

# (policy, params) grids. The uncached run is measured separately.
SWEEP: dict[str, list[dict[str, Any]]] = {
    "foresight": [
        {"warmup": 5, "interval": 3, "threshold": 1.0},
        {"warmup": 5, "interval": 4, "threshold": 1.0},
        {"warmup": 5, "interval": 3, "threshold": 1.0, "reuse": "residual"},
        {"warmup": 5, "interval": 4, "threshold": 2.0, "reuse": "residual"},
        {"warmup": 5, "interval": 6, "threshold": 2.0, "reuse": "residual"},
        {"warmup": 5, "interval": 4, "threshold": 2.0, "reuse": "residual", "mode": "prefix"},
        {"warmup": 5, "interval": 6, "threshold": 2.0, "reuse": "residual", "mode": "prefix"},
    ],
    "static": [{"interval": 2}, {"interval": 3}, {"interval": 3, "reuse": "residual"}, {"interval": 4, "reuse": "residual"}],
    "taylorseer": [{"interval": 3, "order": 1}, {"interval": 4, "order": 1}, {"interval": 4, "order": 2}, {"interval": 6, "order": 2}],
    "first-block": [{"threshold": 0.03}, {"threshold": 0.05}, {"threshold": 0.08}, {"threshold": 0.12}],
    "teacache": [{"threshold": 0.05}, {"threshold": 0.1}, {"threshold": 0.2}, {"threshold": 0.3}],
    "tokencache": [
        {"k1": 2, "k2": 3, "ratio": 0.5},
        {"k1": 3, "k2": 4, "ratio": 0.75, "blocks": 0.75},
        {"k1": 2, "k2": 3, "ratio": 0.5, "importance": "attention"},
        {"k1": 3, "k2": 4, "ratio": 0.75, "blocks": 0.75, "importance": "attention"},
    ],
}
QUICK_SWEEP: dict[str, list[dict[str, Any]]] = {name: grid[:2] for name, grid in SWEEP.items()}
DIFFUSERS_FBC = [0.03, 0.05, 0.08, 0.12]


@dataclass
class Method:
    """One cached configuration: how to attach it, how to detach it, how to read its own skip count."""

    family: str
    params: dict[str, Any]
    attach: Callable[[torch.nn.Module], None]
    detach: Callable[[torch.nn.Module], None]
    stats: Callable[[torch.nn.Module], dict[str, float]] | None = None  # the policy's own (fractional) count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (DDIM)")
    parser.add_argument("--batch", type=int, default=32, help="images per run (CFG doubles the transformer batch)")
    parser.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed (uncached, cached) pairs per configuration, alternating; medians reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 gives stable timings on a shared CPU)")
    parser.add_argument("--policies", default=",".join(SWEEP), help="comma-separated policies to sweep")
    parser.add_argument("--quick", action="store_true", help="two settings per policy, fewer baselines")
    parser.add_argument("--no-external", action="store_true", help="skip diffusers FirstBlockCache and cache-dit")
    parser.add_argument("--weights", default=None, help="trained DiT safetensors (default: the shipped one)")
    parser.add_argument("--output", default="eval/dit/results/dit_bench.json", help="JSON path; the PNG goes beside it")


def _block_counter(model: torch.nn.Module) -> tuple[list[int], list[Any]]:
    count = [0]

    def hook(*_: Any) -> None:
        count[0] += 1

    handles = [block.attn1.register_forward_pre_hook(hook) for block in model.transformer_blocks]
    return count, handles


def _family(name: str, params: dict[str, Any]) -> str:
    """Curve label: the policy name plus its non-default variant switches."""
    tags = [str(params[k]) for k in ("mode", "reuse", "importance") if k in params and params[k] not in ("block", "output", "change")]
    return "-".join([name, *tags])


def _our_method(name: str, params: dict[str, Any]) -> Method:
    from kvcache.engine_adapters.diffusers import cache_stats, disable_cache, enable_cache

    shown = {k: (Path(v).name if k == "predictor" else v) for k, v in params.items() if k != "coefficients"}
    return Method(_family(name, params), shown, lambda m: enable_cache(m, name, **params), disable_cache, cache_stats)


def _diffusers_fbc(threshold: float) -> Method:
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache

    def detach(model: torch.nn.Module) -> None:
        registry = HookRegistry.check_if_exists_or_initialize(model)
        registry.remove_hook("fbc_leader_block_hook", recurse=True)
        registry.remove_hook("fbc_block_hook", recurse=True)

    return Method("diffusers-fbc", {"threshold": threshold},
                  lambda m: apply_first_block_cache(m, FirstBlockCacheConfig(threshold=threshold)), detach)


def _cache_dit(threshold: float) -> Method:
    import cache_dit

    def attach(model: torch.nn.Module) -> None:
        adapter = cache_dit.BlockAdapter(
            transformer=model, blocks=model.transformer_blocks, forward_pattern=cache_dit.ForwardPattern.Pattern_3
        )
        cache_dit.enable_cache(adapter, cache_config=cache_dit.DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold))

    return Method("cache-dit", {"threshold": threshold}, attach, lambda m: cache_dit.disable_cache(m))


def _reset_external(model: torch.nn.Module) -> None:
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None:
        registry.reset_stateful_hooks(recurse=True)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kvcache.eval.dit import digits
    from kvcache.eval.dit.metrics import quality

    torch.set_num_threads(args.threads)
    model = digits.load_trained(Path(args.weights)) if args.weights else digits.load_trained()
    labels = torch.arange(args.batch) % digits.NUM_CLASSES
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SWEEP))
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; choose from {', '.join(SWEEP)}")
    sweep = {n: [dict(p) for p in grid] for n, grid in (QUICK_SWEEP if args.quick else SWEEP).items()}
    calibration = digits.WEIGHTS_DIR / "digits_teacache.json"
    if calibration.exists():  # TeaCache with the polynomial fitted by `kvcache teacache-calibrate`
        coefficients = json.loads(calibration.read_text())["coefficients"]
        for params in sweep["teacache"]:
            params["coefficients"] = coefficients
    predictor = digits.WEIGHTS_DIR / "token_predictor.safetensors"
    if predictor.exists():  # TokenCache with the trained cache predictor beside the training-free one
        sweep["tokencache"] += [{**p, "importance": "predictor", "predictor": str(predictor)}
                                for p in sweep["tokencache"] if "importance" not in p]
    methods = [_our_method(n, p) for n in names for p in sweep[n]]
    external_errors: dict[str, str] = {}
    if not args.no_external:
        thresholds = DIFFUSERS_FBC[1:3] if args.quick else DIFFUSERS_FBC
        try:
            methods += [_diffusers_fbc(t) for t in thresholds]
        except ImportError as err:
            external_errors["diffusers-fbc"] = f"{type(err).__name__}: {err}"
        try:
            methods += [_cache_dit(t) for t in thresholds]
        except ImportError as err:
            external_errors["cache-dit"] = f"not installed ({err})"

    count, handles = _block_counter(model)
    total_blocks = args.steps * len(model.transformer_blocks)

    def once() -> tuple[torch.Tensor, float, int]:
        _reset_external(model)
        count[0] = 0
        start = time.perf_counter()
        out = digits.sample(model, labels, steps=args.steps, guidance=args.guidance, seed=args.seed)
        return (out + 1) / 2, time.perf_counter() - start, count[0]

    digits.sample(model, labels[:2], steps=3, guidance=args.guidance)  # warm up
    recorder = harness.Recorder("cpu")
    reference, _, base_blocks = once()
    base_all: list[float] = []
    results: list[dict[str, Any]] = []
    for method in tqdm(methods, desc="dit-bench", unit="config"):
        cached: dict[str, Any] = {"images": reference, "blocks": 0, "own": None}

        def measure(name: str) -> float:
            if name == "uncached":
                return once()[1]
            method.attach(model)
            try:
                cached["images"], seconds, cached["blocks"] = once()
                cached["own"] = method.stats(model)["fraction_skipped"] if method.stats is not None else None
            finally:
                method.detach(model)
            return seconds

        try:
            runs = harness.alternate(["uncached", "cached"], args.repeats, measure)
        except Exception as err:  # an external library that does not accept this model
            external_errors[method.family] = f"{type(err).__name__}: {err}"
            continue
        base_all += runs["uncached"]
        q = quality(cached["images"], reference)
        # Blocks that ran (counted by the pre-hook); a token-level partial block runs but counts fractionally
        # in the policy's own statistics, which are used where the method has them.
        skipped = cached["own"] if cached["own"] is not None else 1.0 - cached["blocks"] / base_blocks
        timing = {**harness.spread("seconds", runs["cached"]), **harness.spread("uncached_seconds", runs["uncached"])}
        results.append({"family": method.family, "params": method.params, **timing,
                        "speedup": timing["uncached_seconds"] / timing["seconds"],
                        "speedup_best": timing["uncached_seconds_min"] / timing["seconds_min"],
                        "blocks_called": cached["blocks"], "fraction_skipped": skipped,
                        "block_reduction": 1.0 / max(1.0 - skipped, 1e-9), **q})
    base = harness.spread("seconds", base_all) if base_all else {"seconds": math.nan}
    results.insert(0, {"family": "uncached", "params": {}, **base, "uncached_seconds": base["seconds"], "speedup": 1.0,
                       "speedup_best": 1.0, "blocks_called": base_blocks, "fraction_skipped": 0.0, "block_reduction": 1.0,
                       "psnr": math.inf, "ssim": 1.0, "mse": 0.0})
    for h in handles:
        h.remove()

    report = {
        "benchmark": "dit-bench",
        **recorder.finish(),
        "model": {"weights": str(args.weights or digits.WEIGHTS), "blocks": len(model.transformer_blocks),
                  "config": digits.MODEL_CONFIG},
        "settings": {"steps": args.steps, "batch": args.batch, "guidance": args.guidance, "seed": args.seed,
                     "repeats": args.repeats, "scheduler": "DDIM", "total_block_calls": total_blocks},
        "external_errors": external_errors,
        "results": results,
    }
    out = Path(args.output)
    written = harness.write_report(report, out, _plot)
    _print_table(results)
    print("wrote " + " and ".join(map(str, written)))
    return 0


def _print_table(results: list[dict[str, Any]]) -> None:
    print(f"{'method':<24} {'params':<58} {'speedup':>7} {'blocks':>6} {'skipped':>7} {'PSNR':>7} {'SSIM':>6}")
    for r in results:
        params = ",".join(f"{k}={v}" for k, v in r["params"].items())
        print(f"{r['family']:<24} {params:<58} {r['speedup']:>6.2f}x {r['block_reduction']:>5.2f}x "
              f"{r['fraction_skipped']:>7.1%} {r['psnr']:>7.2f} {r['ssim']:>6.3f}")


def _plot(report: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    results, m = report["results"], report["machine"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    families = sorted({r["family"] for r in results if r["family"] != "uncached"})
    colors = plt.get_cmap("tab20")(range(len(families)))
    markers = "osD^v<>pPX*h"
    for ax, key, label in ((axes[0], "speedup", "wall-clock speedup vs uncached (medians, alternating, same run)"),
                           (axes[1], "block_reduction", "block computations: uncached / cached")):
        for n, family in enumerate(families):
            pts = sorted((r[key], r["psnr"]) for r in results if r["family"] == family and math.isfinite(r["psnr"]))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[n % len(markers)],
                        color=colors[n], label=family)
        ax.axhline(30, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PSNR vs uncached output (dB)")
    axes[1].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"DiT feature caching on the trained digits DiT ({m['processor']}, {m['cpus']} cores, "
                 f"{m['torch_threads']} torch thread(s), load {report['load_before']} -> {report['load_after']})", fontsize=10)
    harness.save_figure(fig, path)
