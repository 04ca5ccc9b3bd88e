"""One way to benchmark: every ``kvcache bench ...`` command measures, summarises and writes through here.

* **The machine** (:func:`machine`): platform, processor, cores, torch and its threads, the device (with the
  GPU's name) and the load average, in every benchmark's JSON.
* **How busy it was** (:class:`Recorder`): the 1-minute load average before and after the run, and the share
  of the machine's CPU time that *other* processes used during it (``/proc/stat`` less this process and its
  children: unlike the load average it does not count the benchmark's own threads). The rule: a run is
  busy, and says so in a ``WARNING:`` line on stderr and in the JSON's ``warnings``, when the load average
  before it exceeds ``BUSY_LOAD_PER_CORE`` (0.5) per core, or other processes used more than ``BUSY_SHARE``
  (15%) of the CPU during it. Figures taken on a busy machine are not evidence.
* **Alternation** (:func:`alternate`; :func:`time_calls` for micro-benchmarks): the configurations run in turn
  within every repeat (A B C A B C ..., never all A then all B), so a change in the machine's state during the
  run falls on all of them alike.
* **Statistics** (:func:`stats`, :func:`spread`, :func:`ratios`): median, min, max and quartiles per
  configuration; ratios against a named baseline are ratios of medians.
* **Output** (:func:`write_report`, :func:`pyplot`, :func:`save_figure`, :func:`ratio_bar_plot`): the JSON and
  a PNG beside it (matplotlib's Agg backend; without matplotlib the PNG is skipped with a line saying so).

Every figure is measured (:func:`wall_seconds`, :func:`cuda_seconds`), never computed from a model of the
machine; unit tests check the bookkeeping, never a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence, TypeVar

from kvcache.registry import UsageError

R = TypeVar("R")

BUSY_LOAD_PER_CORE = 0.5
BUSY_SHARE = 0.15
BUSY_RULE = (f"busy: 1-minute load average before the run > {BUSY_LOAD_PER_CORE} per core, or other processes "
             f"used > {BUSY_SHARE:.0%} of the CPU time during it")


# --------------------------------------------------------------------------------------------------
# The machine and its load


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages, or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine(device: str = "cpu") -> dict[str, Any]:
    """Platform, processor, cores, torch version and threads, the device (with the GPU's name) and the load
    average now."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "loadavg_at_start": load_average(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def busy_warning(load: list[float] | None = None, cpus: int | None = None) -> str | None:
    """A warning when the 1-minute load average (``load``, default: now) exceeds ``BUSY_LOAD_PER_CORE`` per
    core, else None."""
    load = load_average() if load is None else load
    cpus = cpus or os.cpu_count() or 1
    if not load or load[0] <= BUSY_LOAD_PER_CORE * cpus:
        return None
    return (f"load average {load[0]:.2f} on {cpus} cores (> {BUSY_LOAD_PER_CORE} per core): other work shares this "
            "machine, so timings (and even ratios) are distorted; measure on an idle machine")


class OtherCpu:
    """Share of the machine's CPU time that other processes used since construction: busy time from
    ``/proc/stat`` less this process's and its waited-for children's (``getrusage``), over wall time x cores.
    0.0 where there is no ``/proc/stat`` (unknown)."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        import resource

        try:
            with open("/proc/stat", encoding="ascii") as handle:
                values = [int(v) for v in handle.readline().split()[1:9]]
            busy_s = (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")
        except OSError:
            busy_s = float("nan")
        own = sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                    resource.getrusage(resource.RUSAGE_CHILDREN)))
        return busy_s, own, time.perf_counter()

    def share(self) -> float:
        busy_s, own_s, now = self._sample()
        wall = max(now - self.start[2], 1e-9) * (os.cpu_count() or 1)
        share = ((busy_s - self.start[0]) - (own_s - self.start[1])) / wall
        return 0.0 if share != share else round(max(0.0, share), 3)


class Recorder:
    """The machine, its load before and after, the other processes' CPU share and the busy warnings of one
    benchmark run. ``sample_s`` > 0 first watches the idle machine that long (this process sleeping) and
    records ``other_cpu_share_before``. :meth:`record` is the JSON's part (call it at every save), :meth:`finish`
    the last one (it warns when other processes used more than ``BUSY_SHARE`` during the run)."""

    def __init__(self, device: str = "cpu", sample_s: float = 0.0) -> None:
        self.machine = machine(device)
        self.load_before = self.machine["loadavg_at_start"]
        self.warnings: list[str] = []
        self.other_cpu_share_before: float | None = None
        if sample_s > 0:
            meter = OtherCpu()
            time.sleep(sample_s)
            self.other_cpu_share_before = meter.share()
            if self.other_cpu_share_before > BUSY_SHARE:
                self.warn(f"machine busy before the run: other processes used {self.other_cpu_share_before:.0%} of the "
                          f"CPU (load average {self.load_before} on {os.cpu_count()} cores)")
        message = busy_warning(self.load_before)
        if message:
            self.warn(message)
        self.others = OtherCpu()

    def warn(self, message: str) -> None:
        """Keep ``message`` for the JSON and print it as a ``WARNING:`` line on stderr."""
        self.warnings.append(message)
        print(f"WARNING: {message}", file=sys.stderr, flush=True)

    def record(self) -> dict[str, Any]:
        """``machine`` (with ``loadavg_at_end``), ``load_before``, ``load_after`` (now), ``other_cpu_share`` (so
        far), ``busy``, ``busy_rule`` and ``warnings``."""
        load_after = load_average()
        share = self.others.share()
        out = {"machine": {**self.machine, "loadavg_at_end": load_after}, "load_before": self.load_before,
               "load_after": load_after, "other_cpu_share": share, "busy": bool(self.warnings) or share > BUSY_SHARE,
               "busy_rule": BUSY_RULE, "warnings": list(self.warnings)}
        if self.other_cpu_share_before is not None:
            out["other_cpu_share_before"] = self.other_cpu_share_before
        return out

    def finish(self) -> dict[str, Any]:
        """The last :meth:`record`, after a warning when other processes used more than ``BUSY_SHARE``."""
        share = self.others.share()
        if share > BUSY_SHARE:
            self.warn(f"machine busy during the run: other processes used {share:.0%} of the CPU")
        return self.record()


# --------------------------------------------------------------------------------------------------
# Measuring


def check_repeats(repeats: int, least: int = 3) -> None:
    """A median and a spread need ``least`` runs per configuration: fewer is the user's mistake."""
    if repeats < least:
        raise UsageError(f"--repeats must be >= {least} (a median and a spread), got {repeats}")


def alternate(
    names: Sequence[str], repeats: int, measure: Callable[[str], R], *, warmup: int = 0,
    after_each: Callable[[str, int, R], None] | None = None, desc: str | None = None,
) -> dict[str, list[R]]:
    """``measure(name)`` for every name in turn, ``repeats`` rounds (A B C A B C ...): every result, per name.
    ``warmup`` rounds first, in the same order, are discarded; ``after_each(name, repeat, result)`` runs after
    every measured call (to save or print); ``desc`` shows a progress bar (tqdm, when installed)."""
    for _ in range(warmup):
        for name in names:
            measure(name)
    runs: dict[str, list[R]] = {name: [] for name in names}
    bar = _progress(desc, repeats * len(names))
    for repeat in range(repeats):
        for name in names:
            result = measure(name)
            runs[name].append(result)
            if after_each is not None:
                after_each(name, repeat, result)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return runs


def _progress(desc: str | None, total: int) -> Any:
    if desc is None:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="run")


def wall_seconds(fn: Callable[[], object]) -> float:
    """Wall seconds of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cuda_seconds(fn: Callable[[], object]) -> float:
    """Seconds of one call of ``fn`` by CUDA events (the GPU's own clock); wall seconds without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return wall_seconds(fn)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def time_calls(
    calls: Mapping[str, Callable[[], object]], repeats: int, *, timer: Callable[[Callable[[], object]], float] = wall_seconds,
    around: Callable[[str], ContextManager[Any]] | None = None, prefix: str = "",
) -> dict[str, Any]:
    """Micro-benchmark: the calls alternate, one warm-up round, then ``repeats`` timed rounds (``timer``: wall
    clock, or :func:`cuda_seconds`), each call inside ``around(name)`` when given (entered outside the timed
    region). Returns ``{prefix}{name}_ms`` (the median in milliseconds) with its ``_min``, ``_max`` and ``_iqr``."""
    def measure(name: str) -> float:
        with around(name) if around is not None else contextlib.nullcontext():
            return timer(calls[name])

    row: dict[str, Any] = {}
    for name, seconds in alternate(list(calls), repeats, measure, warmup=1).items():
        row.update(spread(f"{prefix}{name}_ms", [1e3 * x for x in seconds]))
    return row


# --------------------------------------------------------------------------------------------------
# Statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1), linear between the two nearest ranks (numpy's default); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def stats(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max, first and third quartiles and count of ``values``."""
    if not values:
        raise ValueError("no values to summarise")
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "q1": percentile(values, 0.25), "q3": percentile(values, 0.75), "n": len(values)}


def spread(key: str, values: Sequence[float]) -> dict[str, Any]:
    """``{key: median, key_min, key_max, key_iqr: [q1, q3]}`` of ``values``."""
    s = stats(values)
    return {key: s["median"], f"{key}_min": s["min"], f"{key}_max": s["max"], f"{key}_iqr": [s["q1"], s["q3"]]}


def ratios(medians: Mapping[str, float], baseline: str) -> dict[str, float]:
    """Each median over the baseline's median (the baseline itself: 1.0)."""
    if baseline not in medians:
        raise KeyError(f"baseline {baseline!r} not among {list(medians)}")
    return {name: value / medians[baseline] for name, value in medians.items()}


def summarise_rows(rows: dict[str, dict[str, Any]], key: str, baseline: str, ratio_key: str) -> None:
    """In place, for rows that keep their runs in ``rows[name][key + "_runs"]``: :func:`spread` of the runs under
    ``key``, and, once the baseline has runs, ``ratio_key`` = median / the baseline's median."""
    for row in rows.values():
        row.update(spread(key, row[f"{key}_runs"]))
    if baseline in rows:
        for name, ratio in ratios({n: r[key] for n, r in rows.items()}, baseline).items():
            rows[name][ratio_key] = ratio


# --------------------------------------------------------------------------------------------------
# Output


def write_report(
    report: dict[str, Any], path: Path, plot: Callable[[dict[str, Any], Path], None] | None = None,
    table: Callable[[dict[str, Any]], str] | None = None,
) -> list[Path]:
    """Write ``report`` as JSON to ``path`` (folders made), ``plot(report, png)`` to the PNG beside it, and
    ``table(report)`` to ``table.md`` beside it (also printed). Returns the files written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=float) + "\n")
    written = [path]
    if plot is not None:
        png = path.with_suffix(".png")
        try:
            plot(report, png)
            written.append(png)
        except ImportError as err:
            print(f"matplotlib is not installed ({err}): no PNG written", file=sys.stderr)
    if table is not None:
        text = table(report)
        (path.parent / "table.md").write_text(text + "\n")
        print(text)
        written.append(path.parent / "table.md")
    return written


def ratio_report(meta: dict[str, Any], rows: dict[str, dict[str, Any]], path: Path, key: str, ratio_key: str,
                 ylabel: str, baseline: str = "full") -> dict[str, Any]:
    """:func:`summarise_rows`, then ``{**meta, "rows": rows}`` written to ``path`` with, once the baseline has
    runs, a :func:`ratio_bar_plot` beside it. Returns the report."""
    summarise_rows(rows, key, baseline, ratio_key)
    report = {**meta, "rows": rows}

    def plot(rep: dict[str, Any], png: Path) -> None:
        ratio_bar_plot(rep["rows"], key, ratio_key, baseline, ylabel, rep, png)

    write_report(report, path, plot if baseline in rows else None)
    return report


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 120) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def ratio_bar_plot(rows: dict[str, dict[str, Any]], key: str, ratio_key: str, baseline: str, ylabel: str,
                   report: dict[str, Any], path: Path) -> None:
    """Bars of ``ratio_key`` per row (the baseline grey), whiskers from each row's ``key_min``/``key_max`` over
    the baseline's median, titled with the report's question and load averages."""
    plt = pyplot()
    names = list(rows)
    base = rows[baseline][key]
    values = [rows[n][ratio_key] for n in names]
    errors = [[v - rows[n][f"{key}_min"] / base for n, v in zip(names, values)],
              [rows[n][f"{key}_max"] / base - v for n, v in zip(names, values)]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, values, yerr=errors, capsize=3, color=["grey" if n == baseline else "tab:blue" for n in names])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(f"{report.get('question', '')}\nload average before {report.get('load_before')}, after "
                 f"{report.get('load_after')}", fontsize=7)
    save_figure(fig, path)
