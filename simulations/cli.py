"""The ``fedhead`` command line.

Each subcommand exits 0 on success; otherwise it prints one line per problem
to stderr and exits non-zero (2 for bad input, 1 for a failed run).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from common.errors import FedHeadError
from common.logs import configure_logging

__all__ = ["main"]


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) else "-"


def _print_sites(run_dir: Path) -> None:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1]) if lines else {}
    sites = last.get("sites", {})
    print(f"\nFinal per-site metrics (round {last.get('round')}, each site's validation split):")
    print(f"  {'site':<10} {'train':>7} {'val':>6} {'accuracy':>9} {'f1':>7} {'auroc':>7} {'loss':>7}")
    for name in sorted(sites, key=lambda s: (len(s), s)):
        entry = sites[name]
        ev = entry.get("eval") or {}
        print(
            f"  {name:<10} {entry.get('num_train_examples') or 0:>7} {entry.get('num_eval_examples') or 0:>6} "
            f"{_pct(ev.get('accuracy')):>9} {_pct(ev.get('f1')):>7} {_pct(ev.get('auroc')):>7} "
            f"{(ev.get('loss') or float('nan')):>7.4f}"
        )


def _print_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    print(f"\nRun folder: {run_dir}")
    fwd = summary["backbone_forwards"]
    b = summary["bytes"]
    print(
        f"Accuracy ({summary['evaluated_on']}): {_pct(summary['accuracy'])}, macro F1 {_pct(summary['macro_f1'])}, "
        f"{summary['rounds_completed']} rounds in {summary['wall_seconds']:.0f} s"
    )
    print(
        f"Bytes to a site per round: {b['max_train_bytes_to_site']:,} (head {b['head_parameter_bytes']:,}; "
        f"full model {b['full_model_bytes']:,}; {100 * (b['fraction_of_full_model'] or 0):.2f}% of it)"
    )
    print(
        f"Backbone forward passes: {fwd['total']:,} in all ({'cached features' if fwd['cache_features'] else 'no cache'}; "
        f"server held-out set {fwd['server_eval']:,}; cache hits {fwd['cache_hits']})"
    )


_ROW = re.compile(r"(INFO|WARNING|ERROR) (server|client|common|simulations)[\w.]*: (.*)")


def _simulate(args: argparse.Namespace) -> int:
    from simulations.runner import parse_run_config, run_simulation

    overrides = parse_run_config(args.run_config or "")

    def show(line: str) -> None:
        match = _ROW.search(line)
        if args.verbose:
            print(line, flush=True)
        elif match:
            print(("" if match.group(1) == "INFO" else match.group(1) + ": ") + match.group(3), flush=True)
        elif "Error" in line or "Traceback" in line or "exception" in line.lower():
            print(line, flush=True)

    result = run_simulation(num_sites=args.sites, name=args.name or "", overrides=overrides, on_line=show)
    _print_sites(result.run_dir)
    _print_summary(result.run_dir, result.summary)
    return 0


def _weights_stage(args: argparse.Namespace) -> int:
    from common.weights import sha256_file, stage_weights_file

    dest = stage_weights_file(args.file, backbone=args.backbone)
    print(f"staged {Path(args.file).name} at {dest} (sha256 {sha256_file(dest)})")
    return 0


def _site_check(args: argparse.Namespace) -> int:
    from client.site_data import load_site_data
    from common.config import build_run_config

    cfg = build_run_config({"classes": args.classes} if args.classes else {})
    site = load_site_data(Path(args.data_dir), cfg, name="site")
    print(f"{args.data_dir}: {len(site.train)} training and {len(site.val)} validation images")
    counts = [int((site.train.labels == c).sum()) for c in range(cfg.num_classes)]
    for name, count in zip(cfg.class_names, counts):
        print(f"  {name:<20} {count:>7}")
    if site.skipped:
        print(f"{len(site.skipped)} unreadable images were skipped:", file=sys.stderr)
        for path in site.skipped:
            print(f"  {path}", file=sys.stderr)
        return 1
    return 0


def _bench(args: argparse.Namespace) -> int:
    from simulations.bench import run_bench

    r = run_bench(images=args.images, epochs=args.epochs, rounds=args.rounds, image_size=args.image_size)
    print(f"fedhead bench: mobilenet_v2 at {r['image_size']} px, {r['images']} training images, {r['rounds']} rounds x {r['epochs']} epochs")
    print(f"  {'arm':<8} {'seconds':>9} {'backbone passes':>16} {'val accuracy':>13}")
    for arm in ("plain", "cached"):
        print(f"  {arm:<8} {r[f'{arm}_seconds']:>9.1f} {int(r[f'{arm}_forwards']):>16,} {100 * r[f'{arm}_accuracy']:>12.1f}%")
    print(f"  cached features are {r['speedup']:.1f}x faster than the plain way")
    print(
        f"  a site sends {int(r['head_bytes']):,} parameter bytes per round: "
        f"{100 * r['bytes_fraction']:.2f}% of the full model ({int(r['full_bytes']):,})"
    )
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedhead", description="Federated fine-tuning of a frozen backbone's head.")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a local multi-site simulation through Flower")
    sim.add_argument("--sites", type=int, default=4, help="number of simulated sites (default 4)")
    sim.add_argument("--name", default="", help="run folder name under runs/ (default: time-backbone-strategy)")
    sim.add_argument("--run-config", default="", help='overrides, e.g. "num-server-rounds=5 strategy=\'fedprox\'"')
    sim.add_argument("-v", "--verbose", action="store_true", help="show Flower's full log stream")
    sim.set_defaults(func=_simulate)

    weights = sub.add_parser("weights", help="provision backbone weights").add_subparsers(dest="action", required=True)
    stage = weights.add_parser("stage", help="check a weights file and put it where torchvision looks")
    stage.add_argument("file", help="a torchvision release file, e.g. mobilenet_v2-b0353104.pth")
    stage.add_argument("--backbone", default=None, help="backbone name (default: from the file name)")
    stage.set_defaults(func=_weights_stage)

    site = sub.add_parser("site", help="a site's data").add_subparsers(dest="action", required=True)
    check = site.add_parser("check", help="load and check a site's data before it joins")
    check.add_argument("data_dir", help="an image folder (one sub-folder per class) or a .npz file")
    check.add_argument("--classes", default="", help="comma-separated class names (default: Fashion-MNIST's)")
    check.set_defaults(func=_site_check)

    bench = sub.add_parser("bench", help="measure cached-feature training against the plain way")
    bench.add_argument("--images", type=int, default=2000, help="training images (default 2000)")
    bench.add_argument("--epochs", type=int, default=2, help="local epochs per round (default 2)")
    bench.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    bench.add_argument("--image-size", type=int, default=64, help="pixels (default 64)")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedhead`` console script."""
    args = _parser().parse_args(argv)
    configure_logging(args.log_level)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except FedHeadError as exc:
        for line in str(exc).splitlines():
            print(f"fedhead: {line.strip()}", file=sys.stderr)
        return 1 if type(exc).__name__ == "SimulationError" else 2
    except KeyboardInterrupt:
        print("fedhead: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
