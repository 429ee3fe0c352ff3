"""PNG plots of a benchmark report (matplotlib, Agg backend: no display needed).

- ``PREFIX_latency.png``: TTFT, ITL and end-to-end p50/p99 vs concurrency, one line per target
  (sweeps),
- ``PREFIX_throughput.png``: output tokens/s vs concurrency, one line per target (sweeps),
- ``PREFIX_distributions.png``: the TTFT empirical CDF and the ITL tail (fraction of gaps above
  x, log scale), one line per run (for a sweep, the runs at its highest concurrency; for a
  workload with request classes, per class too),
- ``PREFIX_head_to_head.png`` (paired rounds): the first target's ratio to every other on TTFT
  p50, TTFT p99 and throughput, per concurrency, with its 95% paired interval (log scale; a
  bar that does not cross 1 is a difference beyond the interval).

With paired rounds (`--rounds`), a target's figure at a concurrency is the median over its
rounds, and its distributions pool the samples of every round.

Redraw them from a saved report (`splitserve bench --json`) without running it again:
``python -m bench.plots REPORT.json PREFIX``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import NullFormatter  # noqa: E402

from bench.report import BenchReport, RunReport  # noqa: E402


def _series(runs: list[RunReport], path: str) -> tuple[list[int], list[float]]:
    """(concurrencies, the metric's median over the rounds at each)."""
    import statistics

    by_c: dict[int, list[float]] = {}
    for r in runs:
        v = r.metric(path)
        by_c.setdefault(r.concurrency or 0, []).append(float("nan") if v is None else v)
    xs = sorted(by_c)
    return xs, [statistics.median(by_c[x]) for x in xs]


def _targets(report: BenchReport) -> dict[str, list[RunReport]]:
    """Runs grouped by target, each group ordered by concurrency."""
    out: dict[str, list[RunReport]] = {}
    for r in report.runs:
        out.setdefault(r.target, []).append(r)
    return {t: sorted(rs, key=lambda r: r.concurrency or 0) for t, rs in out.items()}


def is_sweep(report: BenchReport) -> bool:
    """Whether some target ran at more than one concurrency."""
    return any(len({r.concurrency for r in rs}) > 1 for rs in _targets(report).values())


def _concurrency_axis(ax, runs: list[RunReport]) -> None:
    xs = sorted({r.concurrency for r in runs if r.concurrency})
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("concurrency (requests in flight)")
    ax.grid(True, alpha=0.3)


LATENCY_PANELS: tuple[tuple[str, str], ...] = (
    ("ttft_ms", "time to first token"),
    ("itl_ms", "inter-token latency"),
    ("e2e_ms", "end-to-end latency"),
)
"""The latency plot's panels: (report metric, title)."""


def latency_figure(report: BenchReport):
    """The latency-vs-concurrency figure: one panel per LATENCY_PANELS entry, p50 and p99 of
    every target."""
    fig, axes = plt.subplots(1, len(LATENCY_PANELS), figsize=(15, 4.2))
    for ax, (metric, title) in zip(axes, LATENCY_PANELS):
        for i, (target, runs) in enumerate(_targets(report).items()):
            color = f"C{i}"
            for q, style in (("p50", "-"), ("p99", "--")):
                xs, ys = _series(runs, f"{metric}.{q}")
                ax.plot(xs, ys, style, marker="o", color=color, label=f"{target} {q}")
        _concurrency_axis(ax, report.runs)
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_latency(report: BenchReport, path: Path) -> Path:
    fig = latency_figure(report)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_throughput(report: BenchReport, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, (target, runs) in enumerate(_targets(report).items()):
        xs, ys = _series(runs, "output_tok_s")
        ax.plot(xs, ys, "-o", color=f"C{i}", label=target)
    _concurrency_axis(ax, report.runs)
    ax.set_ylabel("output tokens / s")
    ax.set_title("throughput")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cdf(ax, values: list[float], label: str, color: str, style: str = "-",
         tail: bool = False) -> None:
    """Empirical CDF, or with `tail` the fraction of samples above x (log scale: p99 is the
    line's crossing of 1e-2)."""
    if not values:
        return
    xs = sorted(values)
    n = len(xs)
    ys = [1 - (i + 1) / n for i in range(n)] if tail else [(i + 1) / n for i in range(n)]
    if tail:  # the last point (fraction 0) has no place on a log axis
        xs, ys = xs[:-1], ys[:-1]
    ax.step(xs, ys, style, where="post", color=color, label=f"{label} (n={n})")


def plot_distributions(report: BenchReport, path: Path) -> Path:
    groups = _targets(report)
    if is_sweep(report):  # each target's runs at its highest concurrency (every round)
        shown = [[r for r in rs if r.concurrency == rs[-1].concurrency]
                 for rs in groups.values()]
    elif any(r.round is not None for r in report.runs):  # every round of a target, pooled
        shown = list(groups.values())
    else:
        shown = [[r] for r in report.runs]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, runs in enumerate(shown):
        run = runs[0]
        tags = list(run.by_tag) or [""]
        for j, tag in enumerate(tags):
            samples = [s for r in runs for s in r.samples if s.tag == tag or not tag]
            label = run.label if len(runs) == 1 else f"{run.target} ({len(runs)} rounds)"
            name = label + (f" {tag}" if tag else "")
            style = ("-", "--", ":", "-.")[j % 4]
            _cdf(axes[0], [s.ttft_ms for s in samples if s.ttft_ms is not None], name,
                 f"C{i}", style)
            _cdf(axes[1], [x for s in samples for x in s.itl_ms], name, f"C{i}", style,
                 tail=True)
    axes[0].set_ylabel("fraction of requests ≤ x")
    axes[0].set_title("TTFT distribution")
    axes[1].set_yscale("log")
    axes[1].axhline(0.01, color="grey", lw=0.8, ls=":")
    axes[1].set_ylabel("fraction of gaps > x (log; dotted: p99)")
    axes[1].set_title("ITL tail")
    for ax in axes:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("ms")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_head_to_head(report: BenchReport, path: Path) -> Path:
    """The head-to-head ratios with their intervals, one panel per figure."""
    from bench.report import HEAD_TO_HEAD_METRICS, HIGHER_IS_BETTER

    keys = list(report.head_to_head)
    titles = {"ttft_ms.p50": "TTFT p50", "ttft_ms.p99": "TTFT p99",
              "output_tok_s": "output tokens/s"}
    fig, axes = plt.subplots(1, len(HEAD_TO_HEAD_METRICS), sharey=True,
                             figsize=(4.2 * len(HEAD_TO_HEAD_METRICS), 0.45 * len(keys) + 1.6))
    for ax, m in zip(axes, HEAD_TO_HEAD_METRICS):
        for y, key in enumerate(keys):
            p = report.head_to_head[key].get(m)
            if p is None:
                continue
            lo, hi = p.ci95 if p.ci95 else (p.ratio, p.ratio)
            color = {"better": "tab:green", "worse": "tab:red"}.get(p.verdict, "tab:gray")
            ax.errorbar([p.ratio], [y], xerr=[[p.ratio - lo], [hi - p.ratio]], fmt="o",
                        color=color, capsize=3)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks([0.25, 0.5, 1, 2, 4], ["0.25", "0.5", "1", "2", "4"])
        better = "right" if m in HIGHER_IS_BETTER else "left"
        ax.set_title(f"{titles.get(m, m)} ratio ({better} is better)", fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(keys)), keys, fontsize=8)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(report: BenchReport, prefix: str | Path) -> list[Path]:
    """Write the plots that fit the report (vs-concurrency plots only for sweeps)."""
    base = Path(prefix)
    base.parent.mkdir(parents=True, exist_ok=True)
    out = []
    if is_sweep(report):
        out.append(plot_latency(report, base.with_name(base.name + "_latency.png")))
        out.append(plot_throughput(report, base.with_name(base.name + "_throughput.png")))
    out.append(plot_distributions(report, base.with_name(base.name + "_distributions.png")))
    if report.head_to_head:
        out.append(plot_head_to_head(report, base.with_name(base.name + "_head_to_head.png")))
    return out


def main(argv: list[str] | None = None) -> int:
    """Redraw the plots of a saved report: ``python -m bench.plots REPORT.json PREFIX``."""
    import argparse

    from pydantic import ValidationError

    p = argparse.ArgumentParser(prog="python -m bench.plots", description=main.__doc__)
    p.add_argument("report", type=Path, help="a report written by `splitserve bench --json`")
    p.add_argument("prefix", help="write PREFIX_<plot>.png")
    ns = p.parse_args(argv)
    try:
        report = BenchReport.model_validate_json(ns.report.read_bytes())
    except (OSError, ValidationError) as exc:
        p.exit(2, f"python -m bench.plots: error: cannot read a report from {ns.report}: "
                  f"{str(exc).splitlines()[0]}\n")
    if not report.runs:
        p.exit(2, f"python -m bench.plots: error: {ns.report} holds no runs\n")
    for path in write_plots(report, ns.prefix):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
