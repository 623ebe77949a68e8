"""Record-level DP-SGD of the trainable part, with Opacus.

One step: a Poisson sample of the site's images (Opacus's
``UniformWithReplacementSampler``); each sampled image gives ONE gradient, the
mean of its views' gradients (augmentation multiplicity), clipped to
``max_grad_norm``; Opacus's DP optimizer adds Gaussian noise of std
``noise_multiplier * max_grad_norm`` to the sum and divides by the expected
batch. Three ways to get the clipped sum, all over exactly
:func:`trainable_parameters`:

- ``linear`` (a lone linear head, the default): Opacus's ghost clipping in
  closed form. Per image, d loss / d logits = (softmax - target) / V, so the
  gradient norm is sqrt(sum_vw (d_v.d_w)(x_v.x_w + 1)) and the clipped sum
  one matmul: no autograd, no per-image gradient; 1.6-1.9x plain on CPU.
- ``ghost`` (other heads, or one view): Opacus's ghost clipping, inputs
  ``(B, V, F)``: linear layers sum over V inside each image.
- ``hooks`` (open backbone stages with several views): views flattened into
  the batch; each image's per-row gradients from Opacus are averaged.

The sampling and the noise draw from ``generator``: seed it from a secret the
server never sees (:func:`secret_generator`), never from the run's seed, or
the server can subtract the noise and knows who was sampled.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from client.feature_source import FeatureSource
from client.training import build_optimizer
from common.config import RunConfig
from common.errors import FedHeadError
from common.model import trainable_parameters
from common.privacy import DPEvent, contained_logging

__all__ = ["DPTrainReport", "DPTrainingError", "secret_generator", "train_privately"]

log = logging.getLogger(__name__)


class DPTrainingError(FedHeadError, ValueError):
    """The trainable part or the DP parameters cannot give the record-level guarantee."""


@dataclass
class DPTrainReport:
    """What one round of DP-SGD did. Loss and norms are NOT private: keep them in the site's own log."""

    num_examples: int
    epochs_run: int
    train_loss: float
    val_loss: float
    steps: int
    grad_sample_mode: str
    batch_sizes: list[int]
    per_sample_gradients: list[int]
    max_per_sample_norm: float
    clipped_fraction: float
    seconds: float
    optimizer_state: dict | None = None  # the base optimizer's state after the last step (site-local; see train_privately)


def secret_generator() -> torch.Generator:
    """A generator seeded from the OS's secret randomness (for sampling and noise)."""
    return torch.Generator().manual_seed(secrets.randbits(63))


class _ViewsLoss(nn.Module):
    """Cross-entropy of ``(B, [V,] C)`` logits, averaged over each image's views; Opacus sets ``reduction``."""

    def __init__(self, label_smoothing: float) -> None:
        super().__init__()
        self.label_smoothing, self.reduction = label_smoothing, "mean"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        views = 1 if logits.dim() == 2 else logits.shape[1]
        rows = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.repeat_interleave(views),
                               reduction="none", label_smoothing=self.label_smoothing)
        per_image = rows.view(-1, views).mean(1)
        return per_image if self.reduction == "none" else per_image.sum() if self.reduction == "sum" else per_image.mean()


class _ViewsInBatch(nn.Module):
    """Runs ``module`` on ``(B, V, ...)`` inputs as ``B*V`` rows; returns ``(B, V, C)``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.flatten(0, 1)).unflatten(0, x.shape[:2])


def _inputs(source: FeatureSource, index: torch.Tensor, views: int) -> torch.Tensor:
    """All views of the images ``index``: ``(B, V, ...)``."""
    if views == 1:
        return source.get(index).unsqueeze(1)
    rows = source.get(index.repeat_interleave(views), torch.arange(views).repeat(len(index)))
    return rows.unflatten(0, (len(index), views))


@torch.no_grad()
def _clipped_linear_sum(head: nn.Linear, x: torch.Tensor, labels: torch.Tensor, *, smoothing: float, clip: float):
    """Set ``head``'s grads to the sum of clipped per-image gradients; return (summed loss, norms)."""
    log_p = head(x).log_softmax(-1)  # (B, V, C)
    classes = log_p.shape[-1]
    target = F.one_hot(labels, classes).to(log_p.dtype)[:, None, :] * (1 - smoothing) + smoothing / classes
    delta = (log_p.exp() - target) / x.shape[1]  # d loss_image / d logits_view
    inner = torch.bmm(x, x.transpose(1, 2)) + (1.0 if head.bias is not None else 0.0)
    norms = (torch.bmm(delta, delta.transpose(1, 2)) * inner).sum((1, 2)).clamp(min=0).sqrt()
    scaled = delta * (clip / (norms + 1e-6)).clamp(max=1.0)[:, None, None]  # Opacus's clip factor
    head.weight.grad = torch.einsum("bvc,bvf->cf", scaled, x)
    if head.bias is not None:
        head.bias.grad = scaled.sum((0, 1))
    return float(-(target * log_p).sum(-1).mean(1).sum()), norms


def _choose_mode(trainable: nn.Module, params: list[nn.Parameter], views: int) -> tuple[str, nn.Linear | None]:
    stages = getattr(trainable, "open_stages", None)
    head = trainable if stages is None else trainable.head
    if isinstance(head, nn.Linear) and (stages is None or len(stages) == 0) and {id(p) for p in head.parameters()} == {id(p) for p in params}:
        return "linear", head
    return ("hooks" if views > 1 and stages is not None and len(stages) else "ghost"), None


def train_privately(
    trainable: nn.Module,
    train_source: FeatureSource,
    train_labels: torch.Tensor,
    cfg: RunConfig,
    *,
    server_round: int,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    proximal_mu: float = 0.0,
    global_params: list[torch.Tensor] | None = None,
    generator: torch.Generator,
    optimizer_state: dict | None = None,
) -> tuple[DPTrainReport, DPEvent]:
    """``steps`` DP-SGD steps on ``train_source``; returns the report and the DP event actually run.

    ``steps`` is the caller's plan (``local_epochs * round(1 / sample_rate)``),
    ``noise_multiplier`` the run's calibrated one. ``global_params`` (default:
    the parameters on entry) anchor the FedProx term when ``proximal_mu`` > 0.
    ``optimizer_state`` (the report's ``optimizer_state`` of this site's previous
    round) continues the base optimizer's moments instead of starting them from
    zero: they are functions of gradients already noised, so carrying them over
    is post-processing, and they never leave the site.
    """
    DPEvent(noise_multiplier, sample_rate, steps, cfg.max_grad_norm, cfg.accountant)  # validates the plan
    n, views, clip = len(train_source), train_source.num_views, cfg.max_grad_norm
    if n == 0 or len(train_labels) != n:
        raise DPTrainingError(f"round {server_round}: {n} training inputs but {len(train_labels)} labels; need the same number > 0")
    params = [p for _, p in trainable_parameters(trainable)]
    anchors = [p.detach().clone() for p in (params if global_params is None else global_params)] if proximal_mu > 0 else []
    if proximal_mu > 0 and [a.shape for a in anchors] != [p.shape for p in params]:
        raise DPTrainingError(f"global_params {[tuple(a.shape) for a in anchors]} do not match the trainable set's shapes")
    mode, linear = _choose_mode(trainable, params, views)
    with contained_logging(), warnings.catch_warnings():
        # Opacus's backward hooks on a part whose inputs need no gradient make torch warn on every call.
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler
        from opacus.validators import ModuleValidator

        trainable.train()  # TrainablePart keeps the open stages' BatchNorm in eval: statistics never move
        if problems := ModuleValidator.validate(trainable, strict=False):
            raise DPTrainingError(f"the trainable part fails Opacus's validators: {problems}")
        base = build_optimizer(trainable, cfg)
        if optimizer_state is not None:
            try:
                base.load_state_dict(optimizer_state)
            except (ValueError, KeyError, TypeError, RuntimeError) as exc:  # another head, another optimizer
                log.warning("round %d: the kept optimizer state does not fit (%s); the optimizer starts afresh", server_round, exc)
                base = build_optimizer(trainable, cfg)
        kwargs = dict(noise_multiplier=noise_multiplier, max_grad_norm=clip, expected_batch_size=sample_rate * n, generator=generator)
        criterion, module = _ViewsLoss(cfg.label_smoothing), None
        if mode == "hooks":
            module, optimizer = GradSampleModule(_ViewsInBatch(trainable), loss_reduction="mean"), DPOptimizer(base, **kwargs)
        else:  # the fast-gradient-clipping optimizer: p.grad arrives already clipped and summed
            optimizer = DPOptimizerFastGradientClipping(base, **kwargs)
            if mode == "ghost":
                module = GradSampleModuleFastGradientClipping(trainable, loss_reduction="mean", max_grad_norm=clip)
                criterion = DPLossFastGradientClipping(module, optimizer, criterion, "mean")
        if {id(p) for p in optimizer.params} != {id(p) for p in params}:
            raise DPTrainingError("the DP optimizer's parameters are not exactly the trainable set")
        started = time.monotonic()
        sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=sample_rate, generator=generator, steps=steps)
        batch_sizes, counts, total_loss, max_norm, clipped = [], [], 0.0, 0.0, 0
        try:
            for batch in sampler:
                index = torch.as_tensor(batch, dtype=torch.long)
                labels, size = train_labels[index], len(index)
                if size == 0:  # an empty Poisson sample is still a step: noise only
                    for p in params:
                        if mode == "hooks":
                            p.grad_sample = p.new_zeros((0, *p.shape))
                        else:
                            p.grad = torch.zeros_like(p)
                    norms = torch.zeros(0)
                elif mode == "linear":
                    loss_sum, norms = _clipped_linear_sum(linear, _inputs(train_source, index, views), labels,
                                                          smoothing=cfg.label_smoothing, clip=clip)
                    total_loss += loss_sum
                elif mode == "hooks":
                    loss = criterion(module(_inputs(train_source, index, views)), labels)
                    loss.backward()
                    for p in params:  # B*V per-row gradients -> one per image: the mean over its views
                        p.grad_sample = p.grad_sample.unflatten(0, (size, views)).mean(1)
                    norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in params], 1).norm(dim=1)
                    total_loss += loss.item() * size
                else:
                    x = _inputs(train_source, index, views)
                    loss = criterion(module(x[:, 0] if views == 1 else x), labels)
                    loss.backward()  # ghost clipping: norms, clip factors, second backward
                    norms = module.per_sample_gradient_norms.detach()
                    total_loss += loss.item() * size
                batch_sizes.append(size)
                counts.append(len(norms))
                max_norm = max([max_norm, *norms.tolist()])
                clipped += int((norms > clip).sum())
                if optimizer.pre_step():  # (clip,) sum, add noise, divide by the expected batch
                    # Data-independent terms, added to the already-noised mean gradient, outside the
                    # clipped sum: FedProx's mu * (w - w_global) here; weight decay in base.step()
                    # (AdamW decays the weights directly; SGD adds wd * w to this noised gradient).
                    for p, anchor in zip(params, anchors):
                        p.grad.add_(p.detach() - anchor, alpha=proximal_mu)
                    base.step()
                optimizer.zero_grad(set_to_none=True)
        finally:
            if module is not None:
                module.cleanup()
            for p in params:
                p.grad = None
                if hasattr(p, "summed_grad"):
                    del p.summed_grad
    seen = sum(batch_sizes)
    report = DPTrainReport(
        num_examples=n, epochs_run=max(1, round(len(batch_sizes) * sample_rate)),
        train_loss=total_loss / seen if seen else math.nan, val_loss=math.nan, steps=len(batch_sizes),
        grad_sample_mode=mode, batch_sizes=batch_sizes, per_sample_gradients=counts, max_per_sample_norm=max_norm,
        clipped_fraction=clipped / seen if seen else 0.0, seconds=time.monotonic() - started,
        optimizer_state=base.state_dict(),
    )
    log.debug("round %d: %d DP-SGD steps (%s), mean batch %.1f, %.0f%% of per-image gradients clipped",
              server_round, report.steps, mode, seen / max(report.steps, 1), 100 * report.clipped_fraction)
    return report, DPEvent(noise_multiplier, sample_rate, report.steps, clip, cfg.accountant)
