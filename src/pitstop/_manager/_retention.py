"""Which checkpoints to keep: small composable rules, each naming why it keeps a step.

A checkpoint is kept when any rule keeps it; the rest are deleted after each save (the
newest checkpoint is always kept). Rules see only (step, metrics) records read from the
committed manifests, so the best-so-far survives restarts of the training job.

The rule for checkpoints without the metric: :class:`KeepBest` ranks only checkpoints
whose metrics hold ``metric`` as a finite number. A checkpoint without it (or with NaN)
is never "best"; it is kept only if another rule (latest N, every N steps) keeps it.
Ties go to the earlier step: a later checkpoint must be strictly better to displace it,
as with Keras ``ModelCheckpoint(save_best_only=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = ["KeepBest", "KeepEveryN", "KeepLatest", "Record", "RetentionRule", "best_step", "select"]


@dataclass(frozen=True)
class Record:
    """A committed checkpoint as retention sees it."""

    step: int
    metrics: Mapping[str, float]


class RetentionRule(Protocol):
    """Returns the steps this rule keeps, each with the reason shown by ``pitstop ls``."""

    def keep(self, records: Sequence[Record]) -> dict[int, str]: ...


@dataclass(frozen=True, kw_only=True)
class KeepLatest:
    """Keep the newest ``n`` checkpoints (all of them when ``n`` is ``None``)."""

    n: int | None

    def __post_init__(self) -> None:
        if self.n is not None and (type(self.n) is not int or self.n < 1):
            raise ValueError(f"max_to_keep must be a positive int or None, got {self.n!r}")

    def keep(self, records: Sequence[Record]) -> dict[int, str]:
        steps = sorted(r.step for r in records)
        kept = steps if self.n is None else steps[-self.n :]
        return {s: "latest" for s in kept}


@dataclass(frozen=True, kw_only=True)
class KeepBest:
    """Keep the ``n`` best checkpoints by ``metric`` (lowest for ``min``, highest for ``max``)."""

    n: int
    metric: str
    mode: Literal["min", "max"] = "min"

    def __post_init__(self) -> None:
        if type(self.n) is not int or self.n < 1:
            raise ValueError(f"keep_best must be a positive int, got {self.n!r}")
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"best_metric must be a metric name, got {self.metric!r}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {self.mode!r}")

    def ranked(self, records: Sequence[Record]) -> list[Record]:
        scored = [r for r in records if _finite(r.metrics.get(self.metric))]
        sign = 1.0 if self.mode == "min" else -1.0
        return sorted(scored, key=lambda r: (sign * r.metrics[self.metric], r.step))

    def keep(self, records: Sequence[Record]) -> dict[int, str]:
        return {r.step: f"best {self.metric}" for r in self.ranked(records)[: self.n]}


@dataclass(frozen=True, kw_only=True)
class KeepEveryN:
    """Keep every checkpoint whose step is a multiple of ``n``."""

    n: int

    def __post_init__(self) -> None:
        if type(self.n) is not int or self.n < 1:
            raise ValueError(f"keep_every_n_steps must be a positive int or None, got {self.n!r}")

    def keep(self, records: Sequence[Record]) -> dict[int, str]:
        return {r.step: f"every {self.n}" for r in records if r.step % self.n == 0}


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def select(rules: Sequence[RetentionRule], records: Sequence[Record]) -> dict[int, list[str]]:
    """Steps to keep, each with the reasons; steps not returned are to be deleted."""
    kept: dict[int, list[str]] = {}
    for rule in rules:
        for step, why in rule.keep(records).items():
            kept.setdefault(step, []).append(why)
    if records:
        newest = max(r.step for r in records)
        kept.setdefault(newest, ["latest"])
    return dict(sorted(kept.items()))


def best_step(rule: KeepBest | None, records: Sequence[Record]) -> int | None:
    """The best step by ``rule``'s metric, or ``None`` (no rule, or no record has it)."""
    if rule is None:
        return None
    ranked = rule.ranked(records)
    return ranked[0].step if ranked else None
