"""PNG figures of a run, drawn from its round records: accuracy and loss per round, final accuracy per site."""

from __future__ import annotations

from pathlib import Path
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.files import atomic_path  # noqa: E402
from common.round_record import RoundRecord  # noqa: E402

__all__ = ["write_plots"]


def _series(history: list[RoundRecord], section: str, metric: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for record in history:
        value = getattr(record, section).get(metric)
        if isinstance(value, float) and value == value:
            xs.append(record.round)
            ys.append(value)
    return xs, ys


def _epsilon_series(history: list[RoundRecord]) -> dict[str, tuple[list[int], list[float]]]:
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in history:
        for name, site in record.sites.items():
            if site.train and site.train.accepted and site.train.privacy:
                xs, ys = series.setdefault(name, ([], []))
                xs.append(record.round)
                ys.append(site.train.privacy["epsilon_run"])
    return series


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def write_plots(history: list[RoundRecord], out_dir: Path, *, title: str) -> list[Path]:
    """Write ``accuracy.png``, ``loss.png``, ``sites.png`` and, under record-level DP, ``epsilon.png``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for metric in ("accuracy", "loss"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for section, label in (("central_eval", "held-out test set"), ("federated_eval", "sites' validation (weighted)")):
            xs, ys = _series(history, section, metric)
            if xs:
                ax.plot(xs, ys, marker="o", label=label)
        ax.set_xlabel("round")
        ax.set_ylabel(metric)
        ax.set_title(f"{title}: {metric} per round")
        ax.grid(alpha=0.3)
        ax.legend()
        path = out_dir / f"{metric}.png"
        _save(fig, path)
        written.append(path)
    spent = _epsilon_series(history)
    if spent:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, (xs, ys) in sorted(spent.items()):
            ax.plot(xs, ys, marker="o", label=name)
        ax.set_xlabel("round")
        ax.set_ylabel("epsilon spent in this run (record-level DP)")
        ax.set_title(f"{title}: epsilon per site per round")
        ax.grid(alpha=0.3)
        ax.legend()
        path = out_dir / "epsilon.png"
        _save(fig, path)
        written.append(path)
    last = next((r for r in reversed(history) if r.sites), None)
    if last:
        names = sorted(last.sites)
        accs = [(last.sites[n].evaluate.scores.get("accuracy", 0.0) if last.sites[n].evaluate else 0.0) for n in names]
        fig, ax = plt.subplots(figsize=(max(4, 1 + 0.8 * len(names)), 4))
        ax.bar(names, accs, color="tab:blue")
        for i, acc in enumerate(accs):
            ax.text(i, acc, f"{100 * acc:.1f}%", ha="center", va="bottom")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy on the site's validation split")
        ax.set_title(f"{title}: per site, round {last.round}")
        path = out_dir / "sites.png"
        _save(fig, path)
        written.append(path)
    return written
