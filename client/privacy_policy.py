"""The site's privacy policy: rules in a TOML file that the server cannot override.

Keys (all optional; an absent key is no rule)::

    require-dp = true                 # refuse rounds without record-level DP
    max-epsilon = 3.0                 # lifetime epsilon of this data, across runs
    max-delta = 1e-5                  # largest delta a run may use
    min-noise-multiplier = 0.8        # smallest noise multiplier a round may use
    min-examples = 100                # fewest training images a round may use
    allowed-backbones = ["<sha256 of the weights file>", ...]

A round without DP has no finite epsilon, delta or noise: it breaks
``max-epsilon``, ``max-delta`` and ``min-noise-multiplier`` as well as
``require-dp``. :func:`check_round` runs before any training and reports every
broken rule at once, each with its numbers.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from client.privacy_ledger import DP_SGD, PrivacyLedger
from common.errors import ConfigError, FedHeadError

__all__ = ["SitePolicy", "PolicyRefusal", "load_policy", "check_round", "describe"]

_WEIGHTS = re.compile(r"(random-init:)?[0-9a-f]{64}")


class PolicyRefusal(FedHeadError, PermissionError):
    """The site's policy refuses this round; ``rules`` lists the broken rules."""

    public_message = True  # rules and numbers only: the server is told exactly why

    def __init__(self, reasons: list[str]) -> None:
        self.reasons = list(reasons)
        self.rules = [reason.split(":", 1)[0] for reason in self.reasons]
        super().__init__("the site's privacy policy refuses this round: " + "; ".join(self.reasons))


@dataclass(frozen=True)
class SitePolicy:
    """A parsed policy file; ``None`` means the rule is not set."""

    require_dp: bool = False
    max_epsilon: float | None = None
    max_delta: float | None = None
    min_noise_multiplier: float | None = None
    min_examples: int | None = None
    allowed_backbones: tuple[str, ...] | None = None
    source: str = ""


def _number(key: str, value: Any, problems: list[str], *, low: float, high: float = math.inf, integer: bool = False) -> Any:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not (low <= value < high) or not math.isfinite(value):
        kind = "an integer" if integer else "a number"
        problems.append(f"'{key}' = {value!r}: must be {kind} in [{low:g}, {high:g})")
        return None
    return value if integer else float(value)


def load_policy(path: str | os.PathLike) -> SitePolicy:
    """Read and validate a policy file; every problem is reported in one ConfigError."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"site policy {path} cannot be read ({exc.strerror or exc}); check the site config's 'policy'") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"site policy {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 TOML") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"site policy {path} is not valid TOML: {exc}") from None
    known = {f.name.replace("_", "-") for f in fields(SitePolicy)} - {"source"}
    problems = [f"unknown key '{key}'; known keys: {', '.join(sorted(known))}" for key in data if key not in known]
    values: dict[str, Any] = {}
    if "require-dp" in data:
        if isinstance(data["require-dp"], bool):
            values["require_dp"] = data["require-dp"]
        else:
            problems.append(f"'require-dp' = {data['require-dp']!r}: must be true or false")
    if "max-epsilon" in data:
        values["max_epsilon"] = _number("max-epsilon", data["max-epsilon"], problems, low=0.0)
    if "max-delta" in data:
        values["max_delta"] = _number("max-delta", data["max-delta"], problems, low=0.0, high=1.0)
    if "min-noise-multiplier" in data:
        values["min_noise_multiplier"] = _number("min-noise-multiplier", data["min-noise-multiplier"], problems, low=0.0)
    if "min-examples" in data:
        values["min_examples"] = _number("min-examples", data["min-examples"], problems, low=0, integer=True)
    if "allowed-backbones" in data:
        raw = data["allowed-backbones"]
        if not isinstance(raw, list) or not all(isinstance(h, str) and _WEIGHTS.fullmatch(h.lower()) for h in raw):
            problems.append(f"'allowed-backbones' = {raw!r}: must be a list of weights sha256 strings (64 hex characters)")
        else:
            values["allowed_backbones"] = tuple(h.lower() for h in raw)
    if problems:
        raise ConfigError(f"site policy {path} is invalid:\n  - " + "\n  - ".join(problems))
    return SitePolicy(**values, source=str(path))


def check_round(
    policy: SitePolicy,
    *,
    dp_enabled: bool,
    delta: float,
    noise_multiplier: float,
    num_examples: int,
    backbone_sha256: str,
    lifetime_epsilon_after: float,
) -> None:
    """Raise PolicyRefusal naming every rule this round would break, with the numbers; else return."""
    reasons = []
    if policy.require_dp and not dp_enabled:
        reasons.append("require-dp: this site trains only with record-level DP, and the round asks for none")
    if policy.max_epsilon is not None:
        if not dp_enabled:
            reasons.append(f"max-epsilon: a round without DP has unbounded epsilon; the lifetime limit is {policy.max_epsilon:.2f}")
        elif lifetime_epsilon_after > policy.max_epsilon:
            reasons.append(f"max-epsilon: this round would bring the lifetime epsilon to {lifetime_epsilon_after:.2f} "
                           f"> {policy.max_epsilon:.2f} allowed")
    if policy.max_delta is not None:
        if not dp_enabled:
            reasons.append(f"max-delta: a round without DP has no delta guarantee; at most {policy.max_delta:g} is allowed")
        elif delta > policy.max_delta:
            reasons.append(f"max-delta: the run's delta {delta:g} > {policy.max_delta:g} allowed")
    if policy.min_noise_multiplier is not None:
        if not dp_enabled:
            reasons.append(f"min-noise-multiplier: a round without DP adds no noise; at least {policy.min_noise_multiplier:.3g} is required")
        elif noise_multiplier < policy.min_noise_multiplier:
            reasons.append(f"min-noise-multiplier: the noise multiplier {noise_multiplier:.3g} < {policy.min_noise_multiplier:.3g} required")
    if policy.min_examples is not None and num_examples < policy.min_examples:
        reasons.append(f"min-examples: this site would train on {num_examples} examples < {policy.min_examples} required")
    if policy.allowed_backbones is not None and backbone_sha256.lower() not in policy.allowed_backbones:
        reasons.append(f"allowed-backbones: the backbone weights sha256 {backbone_sha256[:16]}... is not one of the "
                       f"{len(policy.allowed_backbones)} allowed")
    if reasons:
        raise PolicyRefusal(reasons)


def describe(policy: SitePolicy, *, ledger: PrivacyLedger, data_fingerprint: str, accountant: str, delta: float | None = None) -> dict[str, Any]:
    """What ``policy`` allows and how much of this data's budget is left (for ``fedhead site check``).

    Epsilon is computed at ``delta``, by default the policy's ``max-delta``.
    """
    delta = delta if delta is not None else policy.max_delta
    if delta is None:
        raise ConfigError("give a delta (--delta 1e-5): the policy sets no 'max-delta' to compute the lifetime epsilon at")
    entries = ledger.entries(data_fingerprint)
    spent = ledger.lifetime_epsilon(data_fingerprint, delta=delta, accountant=accountant)
    return {
        "policy": policy.source,
        "require-dp": policy.require_dp,
        "max-epsilon": policy.max_epsilon,
        "max-delta": policy.max_delta,
        "min-noise-multiplier": policy.min_noise_multiplier,
        "min-examples": policy.min_examples,
        "allowed-backbones": list(policy.allowed_backbones) if policy.allowed_backbones is not None else None,
        "ledger": str(ledger.path),
        "trainings-recorded": sum(1 for e in entries if e.mechanism == DP_SGD),
        "runs-recorded": len({e.run_id for e in entries}),
        "delta": delta,
        "accountant": accountant,
        "lifetime-epsilon": spent,
        "epsilon-left": None if policy.max_epsilon is None else max(0.0, policy.max_epsilon - spent),
    }
