"""The retention policy a directory is written with, recorded with its checkpoints.

Design reason: retention decides what is deleted, so a policy that lives only in the
arguments of one process is a trap. A job written with ``best_metric="val_loss",
keep_best=1`` and resumed (or inspected, or cleaned) by code that does not repeat those
arguments would answer ``best_step() is None`` and delete the best checkpoint at its
next save. Every manifest therefore records the policy of the manager that committed it
(``Manifest.policy``), and a manager or reader resolves its own policy against the one
recorded with the newest checkpoint:

- an option not given takes the recorded value (or the default when nothing is recorded);
- an option given takes effect; when it differs from the recorded value a
  :class:`PolicyChangedWarning` names the old policy, and the new one is recorded with
  the next checkpoint.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal, cast

from ._retention import KeepBest, KeepEveryN, KeepLatest, RetentionRule

__all__ = ["UNSET", "Policy", "PolicyChangedWarning", "Unset", "policy_change", "resolve_policy"]


class Unset:
    """The type of :data:`UNSET`: an option the caller did not give."""

    _instance: Unset | None = None

    def __new__(cls) -> Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


#: Marks a retention option as not given (distinct from an explicit ``None``).
UNSET: Final = Unset()


class PolicyChangedWarning(UserWarning):
    """A manager's retention options differ from the policy recorded in its directory."""


@dataclass(frozen=True, kw_only=True)
class Policy:
    """A resolved retention policy (see the module docstring)."""

    max_to_keep: int | None = 3
    keep_best: int = 0
    best_metric: str | None = None
    best_mode: Literal["min", "max"] = "min"
    keep_every_n_steps: int | None = None

    def __post_init__(self) -> None:
        if self.max_to_keep is not None and (type(self.max_to_keep) is not int or self.max_to_keep < 1):
            raise ValueError(f"max_to_keep must be a positive int or None, got {self.max_to_keep!r}")
        if type(self.keep_best) is not int or self.keep_best < 0:
            raise ValueError(f"keep_best must be an int >= 0, got {self.keep_best!r}")
        if self.keep_best and self.best_metric is None:
            raise ValueError("keep_best needs best_metric: name the metric that ranks checkpoints")
        if self.best_metric is not None and (not isinstance(self.best_metric, str) or not self.best_metric):
            raise ValueError(f"best_metric must be a metric name, got {self.best_metric!r}")
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")
        n = self.keep_every_n_steps
        if n is not None and (type(n) is not int or n < 1):
            raise ValueError(f"keep_every_n_steps must be a positive int or None, got {n!r}")

    @property
    def best(self) -> KeepBest | None:
        """The ranking by ``best_metric`` (also without ``keep_best``: ``best_step()`` answers)."""
        if self.best_metric is None:
            return None
        return KeepBest(n=max(self.keep_best, 1), metric=self.best_metric, mode=self.best_mode)

    def rules(self) -> list[RetentionRule]:
        """The retention rules: a step is kept when any of them keeps it."""
        rules: list[RetentionRule] = [KeepLatest(n=self.max_to_keep)]
        best = self.best
        if best is not None and self.keep_best:
            rules.append(best)
        if self.keep_every_n_steps is not None:
            rules.append(KeepEveryN(n=self.keep_every_n_steps))
        return rules

    def record(self) -> dict[str, Any]:
        """The policy as stored in a manifest (``_manifest.POLICY_KEYS``)."""
        return asdict(self)

    def describe(self) -> str:
        parts = [f"max_to_keep={self.max_to_keep}"]
        if self.best_metric is not None:
            parts += [
                f"best_metric={self.best_metric!r}",
                f"best_mode={self.best_mode!r}",
                f"keep_best={self.keep_best}",
            ]
        if self.keep_every_n_steps is not None:
            parts.append(f"keep_every_n_steps={self.keep_every_n_steps}")
        return ", ".join(parts)


def resolve_policy(given: Mapping[str, Any], recorded: Mapping[str, Any] | None) -> Policy:
    """The policy of a manager given ``given`` options (``UNSET`` = not given) in a directory
    whose newest checkpoint recorded ``recorded`` (``None``: nothing recorded).

    ``keep_best`` not given means 1 when a metric is named, else 0 -- unless the recorded
    policy ranks by the same metric, whose ``keep_best`` is kept.

    Raises:
        ValueError: an option is invalid (naming it).
    """
    explicit = {k: v for k, v in given.items() if not isinstance(v, Unset)}
    base: dict[str, Any] = dict(recorded) if recorded is not None else Policy().record()
    if recorded is None:
        base["keep_best"] = UNSET
    merged = {**base, **explicit}
    if isinstance(merged["keep_best"], Unset) or merged["keep_best"] is None:
        same_metric = recorded is not None and recorded.get("best_metric") == merged["best_metric"]
        merged["keep_best"] = (
            recorded["keep_best"] if same_metric and recorded else int(merged["best_metric"] is not None)
        )
    elif "best_metric" in explicit and explicit["best_metric"] is None and "keep_best" not in explicit:
        merged["keep_best"] = 0  # ranking turned off explicitly: nothing to keep as best
    return Policy(**merged)


def policy_change(policy: Policy, recorded: Mapping[str, Any] | None, *, where: str, stacklevel: int) -> None:
    """Warn (:class:`PolicyChangedWarning`) when ``policy`` is about to replace a different
    ``recorded`` one: called when a writer first applies its policy, not on queries."""
    if recorded is None:
        return
    old = Policy(**cast(dict[str, Any], recorded))
    if old != policy:
        warnings.warn(
            f"{where} was written with the retention policy ({old.describe()}); this manager "
            f"uses ({policy.describe()}), which takes effect now and is recorded with the next "
            "checkpoint. Open it without retention options to keep the recorded policy.",
            PolicyChangedWarning,
            stacklevel=stacklevel + 1,
        )
