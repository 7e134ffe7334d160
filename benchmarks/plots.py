"""The benchmark figures, drawn with matplotlib (a benchmark-only extra, like tqdm: the library never needs it).

matplotlib is imported inside the functions, with the non-interactive Agg backend, so ``python -m benchmarks
--help`` / ``--list`` and ``import benchmarks`` work without it. Each function returns the Figure (the tests
inspect its axes, labels and legend) and ``save`` writes it as a PNG and releases it.
"""
from __future__ import annotations

from .harness import Op, Result


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _sweep_label(op: Op) -> str:
    names = {"B": "batch size B (= M)", "N": "number of embeddings N", "M": "database size M"}
    return names.get(op.sweep, op.sweep)


def _machine(info: dict) -> str:
    return f"{info.get('cpu_model', '')[:48]}, {info.get('threads', '?')} threads, {info.get('mode', '')} mode"


def op_figure(op: Op, results: list[Result], info: dict):
    """Two log-log panels against ``op.sweep``: median time (with the p20-p80 band as error bars) and peak
    memory above the inputs; one line per provider, over the shapes matching ``op.plot_where`` (all the
    shapes that ran if none matches). None when no cell of the op ran."""
    ran = [r for r in results if r.op == op.name and r.status == "ok" and r.sweep_value]
    where = op.plot_where or {}
    sel = [r for r in ran if all(r.shape_params.get(k) == v for k, v in where.items())]
    if not sel:  # e.g. the quick shapes lie off the plotted sweep: plot what ran
        where, sel = {}, ran
    if not sel:
        return None
    plt = _pyplot()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    providers = list(dict.fromkeys(r.provider for r in sel))
    for i, name in enumerate(providers):
        rs = sorted((r for r in sel if r.provider == name), key=lambda r: r.sweep_value)
        dashed = any(r.reference for r in rs)  # the speed-up baselines
        style = dict(color=f"C{i % 10}", marker="o", label=name, linestyle="--" if dashed else "-")
        xs = [r.sweep_value for r in rs]
        lo = [r.median_ms - (r.p20_ms if r.p20_ms is not None else r.median_ms) for r in rs]
        hi = [(r.p80_ms if r.p80_ms is not None else r.median_ms) - r.median_ms for r in rs]
        ax_t.errorbar(xs, [r.median_ms for r in rs], yerr=[lo, hi], capsize=3, **style)
        mem = [(r.sweep_value, r.peak_mib) for r in rs if r.peak_mib and r.peak_mib > 0]
        if mem:
            ax_m.plot([x for x, _ in mem], [m for _, m in mem], **style)
    fixed = ", ".join(f"{k}={v}" for k, v in where.items())
    ax_t.set_title(f"time per call ({op.unit})")
    ax_t.set_ylabel("median wall time [ms]")
    ax_m.set_title("peak memory")
    ax_m.set_ylabel("peak above the inputs [MiB]")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 2048 and 0.5 rather than 2^11 and 5 x 10^-1
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(plain)
        ax.yaxis.set_major_formatter(plain)
        ax.set_xlabel(_sweep_label(op))
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize="small")
    if not ax_m.has_data():
        ax_m.text(0.5, 0.5, "no memory figures", ha="center", va="center", transform=ax_m.transAxes)
    fig.suptitle(f"{op.name}{' (' + fixed + ')' if fixed else ''} — {_machine(info)}")
    return fig


def _largest_compared_shape(op_results: list[Result]) -> str | None:
    """The shape label with the most FLOPs among those where some provider has a speed-up figure."""
    rated = [r for r in op_results if r.speedup is not None and not r.reference]
    if not rated:
        return None
    return max(rated, key=lambda r: (r.flops, r.sweep_value or 0)).shape


def summary_figure(ops: list[Op], results: list[Result], info: dict):
    """One row per op at its largest compared shape: the speed-up of each provider over the reference on
    its device (log scale, 1 = as fast as the reference) and the fraction of the torch.mm fp32 ceiling it
    reaches. None when no provider has a speed-up."""
    rows = []  # (op label, [results at that shape])
    for op in ops:
        rs = [r for r in results if r.op == op.name]
        shape = _largest_compared_shape(rs)
        if shape is not None:
            rows.append((f"{op.name}\n{shape}", [r for r in rs if r.shape == shape and r.status == "ok"]))
    if not rows:
        return None
    plt = _pyplot()
    providers = list(dict.fromkeys(r.provider for _, rs in rows for r in rs if not r.reference))
    height = max(3.5, 0.9 * len(rows) + 1.5)
    fig, (ax_s, ax_g) = plt.subplots(1, 2, figsize=(13, height), layout="constrained", sharey=True)
    bar = 0.8 / max(1, len(providers))
    for j, name in enumerate(providers):
        ys, speed, gemm = [], [], []
        for i, (_, rs) in enumerate(rows):
            r = next((r for r in rs if r.provider == name), None)
            if r is not None and r.speedup is not None:
                ys.append(i - 0.4 + bar * (j + 0.5))
                speed.append(r.speedup)
                gemm.append(100.0 * (r.gemm_frac or 0.0))
        if ys:
            ax_s.barh(ys, speed, height=bar, color=f"C{j % 10}", label=name)
            ax_g.barh(ys, gemm, height=bar, color=f"C{j % 10}", label=name)
    ax_s.set_xscale("log")
    ax_s.axvline(1.0, color="black", linewidth=1)
    ax_s.set_xlabel("speed-up over the reference (same device, log scale)")
    ax_s.set_title("speed-up vs reference at the largest compared shape")
    ax_g.set_xlabel("% of the torch.mm fp32 GEMM ceiling")
    ax_g.set_title("fraction of the GEMM ceiling")
    ax_s.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize="small")
    ax_s.invert_yaxis()
    for ax in (ax_s, ax_g):
        ax.grid(True, axis="x", which="both", alpha=0.3)
    ax_g.legend(fontsize="small", loc="best")
    fig.suptitle(f"flashdml benchmark summary — {_machine(info)}")
    return fig


def save(fig, path: str) -> str:
    """Write `fig` as a PNG at `path` and free it; returns the path."""
    plt = _pyplot()
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path
