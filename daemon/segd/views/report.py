"""Human-facing output of a fit: the summary table and the silhouette-against-k plot."""

from __future__ import annotations

from pathlib import Path

from segd.core.errors import SegdError


def fit_table(scores: dict[int, float], chosen: int, sizes: dict[str, int]) -> str:
    """The k tried with their silhouette (the chosen one marked) and each cluster's size."""
    lines = []
    if scores:
        best = max(scores.values())
        lines.append("  k  silhouette")
        for k in sorted(scores):
            bar = "#" * max(0, round(30 * scores[k] / best)) if best > 0 else ""
            mark = "  <- chosen" if k == chosen else ""
            lines.append(f"{k:3d}  {scores[k]:10.4f}  {bar}{mark}")
        lines.append("")
    lines.append(f"{'cluster':<24} {'images':>7}")
    for folder, size in sizes.items():
        lines.append(f"{folder:<24} {size:7d}")
    return "\n".join(lines)


def plot_silhouette(scores: dict[int, float], chosen: int, out: Path, title: str) -> None:
    """Write the silhouette-against-k curve as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SegdError("--plot needs matplotlib: pip install 'segd[plot]'") from exc
    ks = sorted(scores)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot(ks, [scores[k] for k in ks], marker="o", color="#3366aa")
    if chosen in scores:
        ax.scatter([chosen], [scores[chosen]], s=140, facecolors="none", edgecolors="#cc3311",
                   linewidths=2, zorder=3, label=f"chosen k = {chosen}")
        ax.legend(loc="best")
    ax.set_xlabel("number of clusters k")
    ax.set_ylabel("silhouette score")
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def check_plotting_available() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise SegdError("--plot needs matplotlib: pip install 'segd[plot]'") from exc
