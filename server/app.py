"""The ServerApp: build the model and strategy, run the rounds, write the run folder."""

from __future__ import annotations

import logging
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig, build_run_config
from common.exchange import load_arrayrecord, to_arrayrecord, trainable_layout
from common.logs import configure_logging
from common.model import build_split_model
from server.central_eval import CentralEvaluator
from server.checked_strategy import CheckedStrategy
from server.export import export_model
from server.plots import write_plots
from server.round_log import RoundLog
from server.run_folder import RunFolder, package_versions
from server.strategies import build_strategy
from server.summary import build_summary

__all__ = ["app", "run_federation"]

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point: read the run config once, then run the federation."""
    configure_logging()
    run_federation(grid, build_run_config(context.run_config))


def run_federation(grid: Grid, cfg: RunConfig) -> dict:
    """Run ``cfg.num_server_rounds`` rounds on ``grid`` and write the run folder; return the summary."""
    started = time.monotonic()
    folder = RunFolder.create(cfg)
    model = build_split_model(cfg)
    folder.write_json(
        "config.json",
        {
            "run_config": cfg.to_run_config(),
            "backbone": cfg.backbone,
            "weights_sha256": model.weights_sha256,
            "cut": model.cut_id,
            "preprocessing": model.preprocessing.describe(),
            "trainable_layout": {k: list(v[0]) for k, v in trainable_layout(model.trainable).items()},
            "versions": package_versions(),
        },
    )
    log.info("run folder: %s", folder.root)
    round_log = RoundLog(folder.metrics)
    central: CentralEvaluator | None = None
    round_started = [time.monotonic()]

    def end_of_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        scores = central(arrays) if central else None
        round_log.finish_round(server_round, scores, time.monotonic() - round_started[0])
        round_started[0] = time.monotonic()
        return MetricRecord({f"test-{k}": v for k, v in scores.items()}) if scores else None

    strategy = CheckedStrategy(
        build_strategy(cfg),
        layout=trainable_layout(model.trainable),
        backbone_sha256=model.weights_sha256,
        round_log=round_log,
    )
    site_config = ConfigRecord({"backbone-sha256": model.weights_sha256})
    status, error = "failed", None
    try:
        if cfg.server_eval_data:
            central = CentralEvaluator(model, cfg.server_eval_data, cfg.num_classes)
        result = strategy.start(
            grid=grid,
            initial_arrays=to_arrayrecord(model.trainable),
            num_rounds=cfg.num_server_rounds,
            timeout=cfg.round_timeout,
            train_config=site_config,
            evaluate_config=ConfigRecord(dict(site_config)),
            evaluate_fn=end_of_round,
        )
        rounds = [r for r in round_log.history if r["round"] > 0]
        empty = [r["round"] for r in rounds if not r["aggregated_sites"]]
        if len(empty) == len(rounds):
            error = "no round aggregated any site's update" + _first_problem(rounds)
        else:
            load_arrayrecord(model.trainable, result.arrays)
            manifest = export_model(model, folder.model_dir, class_names=cfg.class_names)
            write_plots(round_log.history, folder.plots_dir, title=folder.root.name)
            if empty:
                status, error = "incomplete", f"rounds {empty} aggregated no update" + _first_problem(rounds)
            elif manifest["files"]["full_model"] is None:
                status, error = "incomplete", f"the full model was not exported: {manifest['full_model_error']}"
            else:
                status = "finished"
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        summary = build_summary(
            cfg,
            model,
            round_log,
            run_name=folder.root.name,
            wall_seconds=time.monotonic() - started,
            server_eval_forwards=central.forwards if central else 0,
            status=status,
            error=error,
        )
        folder.write_json("summary.json", summary)
        log.info("summary written to %s (status %s)", folder.root / "summary.json", status)
    if status != "finished":
        raise RuntimeError(error)
    return summary


def _first_problem(rounds: list[dict]) -> str:
    reasons = [f["reason"] for r in rounds for f in r["failed"]]
    reasons += [p for r in rounds for ps in r["rejected_sites"].values() for p in ps]
    return f"; first problem: {reasons[0]}" if reasons else ""
