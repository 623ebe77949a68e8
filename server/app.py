"""The ServerApp: build the model and strategy, run the rounds, write the run folder."""

from __future__ import annotations

import logging
import time
import uuid

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common.benchmarks import load_benchmark
from common.config import RunConfig, build_run_config
from common.enrolment import load_enrolment
from common.errors import DataError
from common.exchange import load_arrayrecord, to_arrayrecord, trainable_layout
from common.hashing import sha256_file, sha256_safetensors
from common.logs import configure_logging
from common.model import SplitModel, build_split_model
from common.paths import fedhead_home
from common.protocol import build_instruction_config
from common.round_record import RoundRecord
from server.audit_trail import AuditTrail
from server.central_dp import build_central_dp
from server.central_eval import CentralEvaluator, load_eval_arrays
from server.checked_strategy import CheckedStrategy
from server.export import export_model
from server.plots import write_plots
from server.round_recorder import RoundRecorder, arrays_sha256
from server.round_sinks import MetricsFile, log_round_row
from server.run_folder import RunFolder, package_versions
from server.strategies import build_strategy
from server.summary import build_summary

__all__ = ["app", "run_federation", "run_status"]

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point: read the run config once, then run the federation."""
    configure_logging()
    run_federation(grid, build_run_config(context.run_config), run_id=str(context.run_id))


def _held_out(cfg: RunConfig, model: SplitModel) -> CentralEvaluator | None:
    """The server's held-out set: ``server-eval-data``, else the benchmark's test split when its classes are the run's."""
    if cfg.server_eval_data:
        images, labels = load_eval_arrays(cfg.server_eval_data)
        return CentralEvaluator(model, images, labels, num_classes=cfg.num_classes, source=cfg.server_eval_data)
    try:
        bench = load_benchmark(cfg, fedhead_home() / "data")
    except DataError as exc:
        log.warning("no held-out evaluation at the server: %s", exc)
        return None
    if tuple(bench.classes) != cfg.class_names:
        log.info("no held-out evaluation at the server: %s's classes are not this run's", bench.name)
        return None
    images, labels = torch.from_numpy(bench.test_images), torch.from_numpy(bench.test_labels)
    return CentralEvaluator(model, images, labels, num_classes=cfg.num_classes, source=f"{bench.name} test split")


def run_status(records: list[RoundRecord], num_rounds: int) -> tuple[str, str | None]:
    """``finished`` when every sampled site took part in every round, else ``degraded`` or ``failed``, with why."""
    rounds = [r for r in records if r.round > 0]
    empty = [r.round for r in rounds if not r.aggregated_sites]
    problems = [f"round {r.round}: {site}: {'; '.join(reasons)}" for r in rounds for site, reasons in r.problem_sites().items()]
    first = f"; first problem: {problems[0]}" if problems else ""
    if not rounds or len(empty) == len(rounds):
        return "failed", "no round aggregated any site's update" + first
    if len(rounds) < num_rounds:
        return "failed", f"only {len(rounds)} of {num_rounds} rounds ran" + first
    if empty:
        return "degraded", f"rounds {empty} aggregated no update" + first
    if problems:
        sites = sorted({p.site for r in rounds for p in r.problems})
        return "degraded", f"{len(problems)} site-round(s) did not take part fully ({', '.join(sites)})" + first
    return "finished", None


def run_federation(grid: Grid, cfg: RunConfig, *, run_id: str = "") -> dict:
    """Run ``cfg.num_server_rounds`` rounds on ``grid`` and write the run folder; return the summary.

    ``run_id`` is Flower's (what the sites sign); a fresh one when empty.
    Raises when the run failed (no usable model); a ``degraded`` run returns normally.
    """
    started = time.monotonic()
    folder = RunFolder.create(cfg)
    model = build_split_model(cfg)
    layout = trainable_layout(model.trainable)
    folder.write_json(
        "config.json",
        {
            "run_config": cfg.to_run_config(),
            "backbone": cfg.backbone,
            "weights_sha256": model.weights_sha256,
            "cut": model.cut_id,
            "preprocessing": model.preprocessing.describe(),
            "trainable_layout": {k: list(v[0]) for k, v in layout.items()},
            "versions": package_versions(),
        },
    )
    log.info("run folder: %s", folder.root)
    run_id = run_id or uuid.uuid4().hex
    enrolment = load_enrolment(cfg.enrolment) if cfg.enrolment else None
    if enrolment is not None:
        log.info("enrolment: %d sites (%s); nodes are named by it", len(enrolment.sites), ", ".join(sorted(enrolment.sites)))
    trail = AuditTrail(folder.root, cfg, run_id=run_id, enrolled_keys=enrolment.public_keys if enrolment else None)
    initial = to_arrayrecord(model.trainable)
    inner = build_strategy(cfg)
    central = build_central_dp(inner, cfg) if cfg.central_dp else None
    trail.start(
        versions=package_versions(), weights_sha256=model.weights_sha256, head_sha256=arrays_sha256(initial),
        central=central.settings() if central else None,
    )
    recorder = RoundRecorder(
        strategy=cfg.strategy, sinks=[MetricsFile(folder.metrics), trail, log_round_row],
        enrolled=enrolment.names if enrolment else None,
    )
    held_out: CentralEvaluator | None = None

    def end_of_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        scores = held_out(arrays) if held_out else None
        recorder.finish(server_round, central_eval=scores, head_sha256=arrays_sha256(arrays))
        return MetricRecord({f"test-{k}": v for k, v in scores.items()}) if scores else None

    strategy = CheckedStrategy(
        inner,
        layout=layout,
        backbone_sha256=model.weights_sha256,
        max_examples=cfg.max_examples_per_site,
        recorder=recorder,
        require_privacy=cfg.records_dp,
        central=central,
        run_id=run_id,
        num_classes=cfg.num_classes,
        enrolled=enrolment.names if enrolment else None,
    )
    status, error, confusion = "failed", None, None
    try:
        held_out = _held_out(cfg, model)
        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=cfg.num_server_rounds,
            timeout=cfg.round_timeout,
            train_config=build_instruction_config(model.weights_sha256),
            evaluate_config=build_instruction_config(model.weights_sha256),
            evaluate_fn=end_of_round,
        )
        status, error = run_status(recorder.records, cfg.num_server_rounds)
        if status != "failed":
            if held_out:
                confusion = held_out.confusion(result.arrays)
            load_arrayrecord(model.trainable, result.arrays)
            manifest = export_model(
                model, folder.model_dir, class_names=cfg.class_names,
                check_images=held_out.sample if held_out else None, onnx=cfg.export_onnx,
            )
            write_plots(recorder.records, folder.plots_dir, title=folder.root.name)
            if manifest["errors"]:
                status = "degraded"
                error = "; ".join(f"model.{'pt2' if kind == 'torch_export' else kind} was not exported: {why}" for kind, why in manifest["errors"].items())
    except Exception as exc:
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        summary = build_summary(
            cfg,
            model,
            recorder.records,
            run_name=folder.root.name,
            wall_seconds=time.monotonic() - started,
            server_eval_forwards=held_out.forwards if held_out else 0,
            status=status,
            error=error,
            confusion=confusion,
        )
        folder.write_json("summary.json", summary)
        log.info("summary written to %s (status %s)", folder.root / "summary.json", status)
        exported = {p.name: sha256_file(p) for p in sorted(folder.model_dir.glob("*")) if p.is_file() and p.name != "head.safetensors"}
        trail.end(summary, saved_head_sha256=sha256_safetensors(folder.model_dir / "head.safetensors"), model_files=exported)
    if status == "failed":
        raise RuntimeError(error)
    if status == "degraded":
        log.warning("run degraded: %s", error)
    return summary
