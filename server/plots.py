"""Figures of a run, drawn from its round records.

Each ``*_figure`` function returns a matplotlib figure (or None when the run
has nothing to draw); :func:`write_plots` saves the run folder's PNGs and
``fedhead report`` embeds the same figures in its page.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from common.files import write_bytes_atomic  # noqa: E402
from common.round_record import RoundRecord  # noqa: E402

__all__ = [
    "write_plots",
    "png_bytes",
    "metric_figure",
    "epsilon_figure",
    "sites_figure",
    "participation_figure",
    "update_norms_figure",
    "PARTICIPATION",
]

# What a site did in a round, in the participation chart's order and colours.
PARTICIPATION = {
    "not sampled": "#eeeeee",
    "aggregated": "#2a9d8f",
    "refused": "#e9c46a",
    "rejected": "#f4a261",
    "failed": "#e76f51",
    "missing": "#9d0208",
}


def _series(history: list[RoundRecord], section: str, metric: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for record in history:
        value = getattr(record, section).get(metric)
        if isinstance(value, float) and value == value:
            xs.append(record.round)
            ys.append(value)
    return xs, ys


def _per_site(history: list[RoundRecord], value) -> dict[str, tuple[list[int], list[float]]]:
    """Site -> (rounds, values) of ``value(site_round)`` over accepted train replies where it is not None."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in history:
        for name, site in record.sites.items():
            if site.train and site.train.accepted and (y := value(site)) is not None:
                xs, ys = series.setdefault(name, ([], []))
                xs.append(record.round)
                ys.append(y)
    return series


def _axes(title: str, xlabel: str, ylabel: str, size=(6, 4)):
    fig, ax = plt.subplots(figsize=size)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig, ax


def metric_figure(history: list[RoundRecord], metric: str, *, title: str) -> Figure:
    """``metric`` (accuracy or loss) per round, on the held-out set and on the sites' validation splits."""
    fig, ax = _axes(f"{title}: {metric} per round", "round", metric)
    for section, label in (("central_eval", "held-out test set"), ("federated_eval", "sites' validation (weighted)")):
        xs, ys = _series(history, section, metric)
        if xs:
            ax.plot(xs, ys, marker="o", label=label)
    if ax.get_legend_handles_labels()[0]:  # a run with no rounds recorded draws empty axes, without a legend
        ax.legend()
    return fig


def epsilon_figure(history: list[RoundRecord], *, title: str, client_level: bool = False) -> Figure | None:
    """Record-level epsilon spent per site per round, with the run's client-level epsilon when ``client_level``."""
    spent = _per_site(history, lambda s: s.train.privacy["epsilon_run"] if s.train.privacy else None)
    central = [(r.round, r.central_privacy["epsilon"]) for r in history if r.central_privacy] if client_level else []
    if not spent and not central:
        return None
    fig, ax = _axes(f"{title}: epsilon per round", "round", "epsilon spent in this run")
    for name, (xs, ys) in sorted(spent.items()):
        ax.plot(xs, ys, marker="o", label=f"{name} (record-level)")
    if central:
        ax.plot(*zip(*central), color="black", linestyle="--", marker="s", label="federation (client-level)")
    ax.legend()
    return fig


def update_norms_figure(history: list[RoundRecord], *, title: str) -> Figure | None:
    """The L2 norm of each site's accepted update per round."""
    norms = _per_site(history, lambda s: s.train.update_l2_norm)
    if not norms:
        return None
    fig, ax = _axes(f"{title}: update norm per site", "round", "L2 norm of the update")
    for name, (xs, ys) in sorted(norms.items()):
        ax.plot(xs, ys, marker="o", label=name)
    ax.legend()
    return fig


def site_status(record: RoundRecord, name: str) -> str:
    """What ``name`` did in the train phase of ``record``: a key of PARTICIPATION."""
    for problem in record.problems:
        if problem.site == name and problem.phase == "train":
            return problem.kind
    return "aggregated" if name in record.aggregated_sites else "not sampled"


def participation_figure(history: list[RoundRecord], sites: list[str], *, title: str) -> Figure | None:
    """A site-by-round grid: aggregated, refused, rejected, failed, missing or not sampled."""
    rounds = [r for r in history if r.round > 0]
    if not rounds or not sites:
        return None
    kinds = list(PARTICIPATION)
    grid = [[kinds.index(site_status(r, name)) for r in rounds] for name in sites]
    fig, ax = plt.subplots(figsize=(max(5, 1.5 + 0.45 * len(rounds)), 1.6 + 0.4 * len(sites)))
    ax.imshow(grid, cmap=ListedColormap(list(PARTICIPATION.values())), vmin=0, vmax=len(kinds) - 1, aspect="auto")
    ax.set_xticks(range(len(rounds)), [str(r.round) for r in rounds])
    ax.set_yticks(range(len(sites)), sites)
    ax.set_xlabel("round")
    ax.set_title(f"{title}: who took part in training")
    used = sorted({k for row in grid for k in row})
    ax.legend(handles=[Patch(color=PARTICIPATION[kinds[k]], label=kinds[k]) for k in used],
              loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return fig


def sites_figure(history: list[RoundRecord], *, title: str) -> Figure | None:
    """Accuracy per site on its validation split, in the last round any site replied."""
    last = next((r for r in reversed(history) if r.sites), None)
    if last is None:
        return None
    names = sorted(last.sites)
    accs = [(last.sites[n].evaluate.scores.get("accuracy", 0.0) if last.sites[n].evaluate else 0.0) for n in names]
    fig, ax = plt.subplots(figsize=(max(4, 1 + 0.8 * len(names)), 4))
    ax.bar(names, accs, color="tab:blue")
    for i, acc in enumerate(accs):
        ax.text(i, acc, f"{100 * acc:.1f}%", ha="center", va="bottom")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy on the site's validation split")
    ax.set_title(f"{title}: per site, round {last.round}")
    return fig


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write_plots(history: list[RoundRecord], out_dir: Path, *, title: str) -> list[Path]:
    """Write ``accuracy.png``, ``loss.png``, ``sites.png`` and, under record-level DP, ``epsilon.png``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        "accuracy": metric_figure(history, "accuracy", title=title),
        "loss": metric_figure(history, "loss", title=title),
        "epsilon": epsilon_figure(history, title=title),
        "sites": sites_figure(history, title=title),
    }
    written = []
    for name, fig in figures.items():
        if fig is None:
            continue
        path = out_dir / f"{name}.png"
        write_bytes_atomic(path, png_bytes(fig))
        written.append(path)
    return written
