"""The split model: a frozen trunk, and the trainable part (open stages + head).

``build_split_model`` is the one place that decides what is trainable. The
optimizer, Opacus and the parameter exchange all draw from
:func:`trainable_parameters` of the returned ``trainable`` module, so they can
never disagree about the set.

The frozen trunk is built when first used. A site whose features are all in
its cache needs only the head, the weights' sha256 and the cache key, so its
round never builds the backbone nor imports torchvision: a deployment
ClientApp process is a fresh interpreter per message, and a cache-hit
``evaluate`` message measured 4.7 s of CPU instead of 7.0 s on a 2-core machine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from common.backbones import BackboneSpec, get_backbone_spec
from common.config import RunConfig
from common.errors import ConfigError
from common.hashing import sha256_arrays
from common.heads import build_head, describe_head
from common.preprocessing import Preprocessing, build_preprocessing
from common.view_average import VIEW_SETS, ViewAveragedTrunk, shift_pixels
from common.weights import read_weights_file, verified_weights_file

__all__ = ["SplitModel", "TrainablePart", "build_split_model", "module_bytes", "trainable_parameters"]

log = logging.getLogger(__name__)


class TrainablePart(nn.Module):
    """The open backbone stages followed by the head: everything that learns."""

    def __init__(self, open_stages: list[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.open_stages = nn.Sequential(*open_stages)
        self.head = head

    def forward(self, trunk_output: torch.Tensor) -> torch.Tensor:
        return self.head(self.open_stages(trunk_output))

    def train(self, mode: bool = True) -> "TrainablePart":
        """Train mode for the head; normalisation layers keep their pretrained statistics."""
        super().train(mode)
        for module in self.open_stages.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self


class SplitModel:
    """A backbone cut at ``cut`` stages, with its preprocessing and identity; the trunk is built on first use."""

    def __init__(
        self,
        *,
        spec: BackboneSpec,
        trainable: TrainablePart,
        preprocessing: Preprocessing,
        weights_sha256: str,
        cut: int,
        head_layout: dict,
        build_trunk: Callable[[], tuple[nn.Module, int]],
        feature_views: str = "one",
    ) -> None:
        self.spec = spec
        self.trainable = trainable
        self.preprocessing = preprocessing
        self.weights_sha256 = weights_sha256
        self.cut = cut
        self.num_stages = spec.num_stages
        self.head_layout = head_layout
        self.feature_views = feature_views
        self.trunk_passes = len(VIEW_SETS[feature_views])
        self._build_trunk = build_trunk
        self._trunk: nn.Module | None = None
        self._trunk_bytes = 0
        self._trunk_device = torch.device("cpu")

    @property
    def trunk(self) -> nn.Module:
        """The frozen trunk (built, with its weights loaded, on first access; on :meth:`place_trunk`'s device)."""
        if self._trunk is None:
            self._trunk, self._trunk_bytes = self._build_trunk()
            self._trunk.to(self._trunk_device)
        return self._trunk

    @property
    def trunk_built(self) -> bool:
        """Whether the trunk has been built (a round served from the feature cache never builds it)."""
        return self._trunk is not None

    def place_trunk(self, device: torch.device | str) -> None:
        """Keep the trunk on ``device``: now if it is built, else when it is."""
        self._trunk_device = torch.device(device)
        if self._trunk is not None:
            self._trunk.to(self._trunk_device)

    @property
    def trunk_bytes(self) -> int:
        """Bytes of the trunk as published, before its BatchNorms were folded."""
        self.trunk  # noqa: B018 (builds it if needed)
        return self._trunk_bytes

    def model_bytes(self) -> int:
        """Bytes of the whole model (trunk as published, open stages, head): what a site would send without fedhead."""
        return self.trunk_bytes + module_bytes(self.trainable)

    @property
    def cut_id(self) -> str:
        """Names the cache point: which stage's output the trunk produces (and over which views, if not one)."""
        cut = f"{self.spec.name}:stage{self.cut}of{self.num_stages}"
        return cut if self.feature_views == "one" else f"{cut}:views={self.feature_views}"

    def full_model(self) -> nn.Module:
        """Trunk and trainable part as one module, for export and centralised use."""
        return nn.Sequential(self.trunk, self.trainable)


def module_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module``."""
    tensors = list(module.parameters()) + list(module.buffers())
    return int(sum(t.numel() * t.element_size() for t in tensors))


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The named parameters that require gradients, in a stable order."""
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


def _disable_inplace(module: nn.Module) -> None:
    for sub in module.modules():
        if hasattr(sub, "inplace") and isinstance(sub.inplace, bool):
            sub.inplace = False


def _fold_batch_norms(module: nn.Module) -> int:
    """Fold each eval-mode BatchNorm into the convolution right before it, in place; return how many.

    In a frozen trunk a BatchNorm is a fixed per-channel affine map, so
    ``fuse_conv_bn_eval`` moves it into that convolution's weights and bias
    (the same function up to float rounding, ~1e-5 relative on MobileNetV2's
    features) and the trunk saves a pass over every activation. Only pairs
    that follow each other inside an ``nn.Sequential`` are folded, where the
    convolution's output feeds nothing else; the trunk's parameters stay frozen.
    """
    folded = 0
    for parent in list(module.modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = parent._modules[first], parent._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats:
                fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv.eval(), norm.eval())
                fused.requires_grad_(False)
                parent._modules[first], parent._modules[second] = fused, nn.Identity()
                folded += 1
    return folded


def _frozen_trunk(stages: list[nn.Module]) -> tuple[nn.Module, int]:
    """The trunk of ``stages``, frozen, BatchNorms folded; with its size in bytes before folding."""
    trunk = nn.Sequential(*stages)
    for p in trunk.parameters():
        p.requires_grad_(False)
    trunk.eval()
    trunk_bytes = module_bytes(trunk)
    folded = _fold_batch_norms(trunk)
    trunk.to(memory_format=torch.channels_last)  # see common.features.extract_features
    log.debug("trunk of %d stages built, %d BatchNorms folded into its convolutions", len(stages), folded)
    return trunk, trunk_bytes


def build_split_model(cfg: RunConfig, *, head_seed: int | None = None) -> SplitModel:
    """Build the backbone named in ``cfg``, load its weights and cut it.

    Pretrained weights resolve through :mod:`common.weights`; with
    ``pretrained=false`` the backbone is randomly initialised from ``cfg.seed``
    (identically at every site). The head is initialised from ``head_seed``
    (default ``cfg.seed``). With no open stage and pretrained weights, the
    backbone itself is built only when ``trunk`` is first used.
    """
    spec = get_backbone_spec(cfg.backbone)
    preprocessing = build_preprocessing(spec, cfg.image_size)
    if cfg.unfreeze_blocks >= spec.num_stages:
        raise ConfigError(
            f"'unfreeze-blocks' = {cfg.unfreeze_blocks}: backbone '{spec.name}' has "
            f"{spec.num_stages} stages; choose 0..{spec.num_stages - 1}"
        )
    cut = spec.num_stages - cfg.unfreeze_blocks
    weights_path, weights_sha256 = verified_weights_file(spec, cfg.weights_file) if cfg.pretrained else (None, "")

    def build_stages() -> tuple[nn.Module, list[nn.Module]]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = spec.build()
        if weights_path is not None:
            model.load_state_dict(read_weights_file(weights_path), strict=True)
        stages = spec.split(model)
        if len(stages) != spec.num_stages:
            raise ConfigError(f"backbone '{spec.name}' split into {len(stages)} stages, its spec says {spec.num_stages}")
        return model, stages

    model, stages = None, None
    if weights_path is None or cut < spec.num_stages:  # the random weights' hash, or the open stages, need it now
        model, stages = build_stages()
    if weights_path is None:
        weights_sha256 = "random-init:" + sha256_arrays(model.state_dict())
    open_stages = stages[cut:] if stages is not None else []
    for stage in open_stages:
        _disable_inplace(stage)
        for module in stage.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                for p in module.parameters(recurse=False):
                    p.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed if head_seed is None else head_seed)
        head = build_head(cfg.head, spec.feature_dim, cfg.num_classes, hidden=cfg.head_hidden)
    trainable = TrainablePart(open_stages, head)
    n_params = sum(p.numel() for _, p in trainable_parameters(trainable))
    log.debug("%s cut at %d/%d: %d trainable parameters", spec.name, cut, spec.num_stages, n_params)
    return SplitModel(
        spec=spec,
        trainable=trainable,
        preprocessing=preprocessing,
        weights_sha256=weights_sha256,
        cut=cut,
        head_layout=describe_head(cfg.head, spec.feature_dim, cfg.num_classes, hidden=cfg.head_hidden),
        build_trunk=lambda: _averaged(_frozen_trunk((stages or build_stages()[1])[:cut]), cfg.feature_views, cfg.image_size),
        feature_views=cfg.feature_views,
    )


def _averaged(built: tuple[nn.Module, int], feature_views: str, image_size: int) -> tuple[nn.Module, int]:
    """The trunk as is for one view, else wrapped to average its features over the named views."""
    trunk, trunk_bytes = built
    if feature_views == "one":
        return trunk, trunk_bytes
    return ViewAveragedTrunk(trunk, VIEW_SETS[feature_views], shift_pixels(image_size)).eval(), trunk_bytes
