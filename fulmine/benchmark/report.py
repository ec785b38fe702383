"""Statistics of a benchmark level, the human table, the JSON line, the plots."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fulmine.benchmark.client import RequestResult


def percentile(values: list[float], q: float) -> float:
    """The q-th quantile by nearest rank (NaN for no values): the one definition every benchmark uses."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    return {"p50": percentile(values, 0.50), "p90": percentile(values, 0.90), "p99": percentile(values, 0.99)}


@dataclass
class Summary:
    endpoint: str
    workload: str
    concurrency: int
    requests: int
    errors: int
    duration_s: float
    ttft_s: dict[str, float | None]
    itl_s: dict[str, float | None]
    tpot_s: dict[str, float | None]
    e2e_s: dict[str, float | None]
    tok_s_per_user: float | None  # median over requests of decode tokens / decode time
    tok_s_total: float  # completion tokens of the level / its wall time
    slo_attainment: float  # fraction of requests within both SLOs
    goodput_rps: float  # requests within the SLOs per second
    extra: dict[str, Any] = field(default_factory=dict)  # spec acceptance, GB/s, roofline share


def summarize(
    endpoint: str,
    workload: str,
    concurrency: int,
    results: list[RequestResult],
    duration: float,
    slo_ttft: float,
    slo_itl: float,
) -> Summary:
    ok = [r for r in results if r.ok]
    speeds = [(r.completion_tokens - 1) / (r.e2e - r.ttft) for r in ok if r.completion_tokens > 1 and r.e2e > r.ttft]

    def within(r: RequestResult) -> bool:
        itl = statistics.mean(r.itls) if r.itls else 0.0
        return r.ttft <= slo_ttft and itl <= slo_itl

    good = sum(1 for r in ok if within(r))
    refused = [r for r in results if r.refused]
    extra: dict[str, Any] = {}
    thinkers = [r for r in ok if r.ttfat > r.ttft]
    if thinkers:  # a reasoning model: the time to the first answer token, after the thinking
        extra["ttfat_p50_ms"] = (percentiles([r.ttfat or r.e2e for r in ok])["p50"] or 0.0) * 1e3
    if refused:  # by latency targets: how many, and how long a refusal took at most
        extra["refused"] = len(refused)
        extra["refuse_max_ms"] = max(r.e2e for r in refused) * 1e3
    return Summary(
        endpoint=endpoint,
        workload=workload,
        concurrency=concurrency,
        requests=len(results),
        errors=len(results) - len(ok),
        duration_s=duration,
        ttft_s=percentiles([r.ttft for r in ok]),
        itl_s=percentiles([gap for r in ok for gap in r.itls]),
        tpot_s=percentiles([t for r in ok if (t := r.tpot) is not None]),
        e2e_s=percentiles([r.e2e for r in ok]),
        tok_s_per_user=statistics.median(speeds) if speeds else None,
        tok_s_total=sum(r.completion_tokens for r in ok) / duration if duration > 0 else 0.0,
        slo_attainment=good / len(results) if results else 0.0,
        goodput_rps=good / duration if duration > 0 else 0.0,
        extra=extra,
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def table(summaries: list[Summary]) -> str:
    header = (
        f"{'endpoint':<12}{'workload':<9}{'conc':>5}{'ok':>5}{'TTFT p50/p90/p99 ms':>22}{'ITL p50/p90 ms':>16}"
        f"{'TPOT p50 ms':>12}{'tok/s/user':>11}{'tok/s all':>10}{'SLO %':>7}{'goodput r/s':>12}  extra"
    )
    lines = [header, "-" * len(header)]
    for s in summaries:
        ttft = "/".join(_ms(s.ttft_s[k]) for k in ("p50", "p90", "p99"))
        itl = "/".join(_ms(s.itl_s[k]) for k in ("p50", "p90"))
        per_user = "-" if s.tok_s_per_user is None else f"{s.tok_s_per_user:.1f}"
        extra = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.extra.items())
        lines.append(
            f"{s.endpoint:<12}{s.workload:<9}{s.concurrency:>5}{s.requests - s.errors:>5}{ttft:>22}{itl:>16}"
            f"{_ms(s.tpot_s['p50']):>12}{per_user:>11}{s.tok_s_total:>10.1f}{s.slo_attainment * 100:>7.0f}"
            f"{s.goodput_rps:>12.2f}  {extra}"
        )
    return "\n".join(lines)


def ratios(summaries: list[Summary], ours: str, peer: str) -> dict[str, dict[str, float]]:
    """ours / peer per workload and concurrency: tok/s per user (higher is better), TTFT and TPOT p50 (lower)."""
    index = {(s.endpoint, s.workload, s.concurrency): s for s in summaries}
    out: dict[str, dict[str, float]] = {}
    for (endpoint, workload, concurrency), a in index.items():
        b = index.get((peer, workload, concurrency))
        if endpoint != ours or b is None:
            continue
        entry: dict[str, float] = {}
        if b.errors:  # the peer dropped requests: its figures are of the survivors, not comparable
            out[f"{workload}@{concurrency}"] = {"peer_failed": float(b.errors)}
            continue
        if a.tok_s_per_user and b.tok_s_per_user:
            entry["tok_s_per_user"] = a.tok_s_per_user / b.tok_s_per_user
        for key in ("ttft_s", "tpot_s"):
            x, y = getattr(a, key)["p50"], getattr(b, key)["p50"]
            if x and y:
                entry[f"{key[:-2]}_p50"] = x / y
        out[f"{workload}@{concurrency}"] = entry
    return out


def as_json(summaries: list[Summary]) -> list[dict[str, Any]]:
    return [asdict(s) for s in summaries]


def plot(
    summaries: list[Summary], results: dict[tuple[str, str, int], list[RequestResult]], directory: Path
) -> list[Path]:
    """latency_cdf.png (TTFT and TPOT per endpoint, lowest concurrency) and tok_s_per_user.png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit("fulmine bench: --plot needs matplotlib (pip install 'fulmine[bench]')") from error
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (endpoint, workload, concurrency), rs in sorted(results.items()):
        ok = [r for r in rs if r.ok]
        for ax, values in ((axes[0], [r.ttft for r in ok]), (axes[1], [t for r in ok if (t := r.tpot)])):
            if values:
                xs = sorted(v * 1000 for v in values)
                ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=f"{endpoint} {workload} c{concurrency}")
    for ax, title in zip(axes, ("TTFT (ms)", "TPOT (ms)")):
        _label(ax, title, "fraction of requests")
    written.append(_save(plt, fig, directory / "latency_cdf.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for endpoint, workload in sorted({(s.endpoint, s.workload) for s in summaries}):
        points = sorted(
            (s.concurrency, s.tok_s_per_user)
            for s in summaries
            if (s.endpoint, s.workload) == (endpoint, workload) and s.tok_s_per_user
        )
        if points:
            ax.plot([c for c, _ in points], [v for _, v in points], marker="o", label=f"{endpoint} {workload}")
    _label(ax, "concurrent users", "tokens/s per user")
    written.append(_save(plt, fig, directory / "tok_s_per_user.png"))
    return written


def _label(ax: Any, x: str, y: str) -> None:
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
