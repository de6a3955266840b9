"""Human-facing output of a fit: the summary table, how sure the choice of k is, the plot."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from segd.core.errors import SegdError

if TYPE_CHECKING:
    from segd.core.cluster import FitResult


RULE_SCORE = {"strength": "prediction strength", "silhouette": "silhouette"}


def score_name(rule: str) -> str:
    """What a fit's per-k scores are, in words."""
    return RULE_SCORE.get(rule, "silhouette")


def choice_line(fit: FitResult) -> str:
    """How k was chosen and how sure the choice is, in one sentence."""
    if fit.rule == "fixed":
        return f"k = {fit.k} as asked (--k or clustering.k)."
    name = score_name(fit.rule)
    if not fit.structured:
        # Weakly clustered real photos can look like that too (docs/quality.md, "A
        # collection no round saw"): say which split came nearest to passing.
        candidate = f" (the best candidate was k = {fit.runner_up})" if fit.runner_up else ""
        return (f"No cluster structure found: no k from {min(fit.scores, default=2)} to "
                f"{max(fit.scores, default=2)} separates these images better than "
                "unstructured data of the same size would, so they all went into one "
                f"folder. Pass --k N to split them anyway{candidate}.")
    sure = f", margin {fit.margin:+.3f}" if fit.margin is not None else ""
    runner = f"; runner-up k = {fit.runner_up}" if fit.runner_up is not None else ""
    return f"k = {fit.k} chosen by the {name}{sure}{runner}."


def fit_table(fit: FitResult | None, sizes: dict[str, int]) -> str:
    """The k tried with their scores (the chosen one marked), how sure the choice is, and
    each cluster's size."""
    lines = []
    scores = fit.scores if fit is not None else {}
    if scores:
        best = max(scores.values())
        lines.append(f"  k  {score_name(fit.rule)}")
        for k in sorted(scores):
            bar = "#" * max(0, round(30 * scores[k] / best)) if best > 0 else ""
            mark = "  <- chosen" if k == fit.k and fit.structured else ""
            lines.append(f"{k:3d}  {scores[k]:10.4f}  {bar}{mark}")
        lines.append("")
    if fit is not None:
        lines += [choice_line(fit), ""]
    lines.append(f"{'cluster':<24} {'images':>7}")
    for folder, size in sizes.items():
        lines.append(f"{folder:<24} {size:7d}")
    return "\n".join(lines)


def plot_scores(scores: dict[int, float], chosen: int, out: Path, title: str,
                rule: str = "silhouette") -> None:
    """Write the score-against-k curve of the rule that chose k as a PNG."""
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
    ax.set_ylabel(score_name(rule))
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
