"""Lifecycle stages of a lead, and which moves between them are allowed.

The funnel, in order::

    subscriber < lead < mql < sql < opportunity < customer

and two stages off it: ``disqualified`` (not a fit, never to be routed) and ``recycled`` (was
worked, did not buy; may qualify again later).

Who moves a lead, and how:

* the **threshold policy** (``scoring.thresholds``), after each score: only between ``subscriber``,
  ``lead``, ``mql`` and ``sql``, and out of ``recycled`` into ``mql``/``sql``; forward only unless
  the policy allows demotion (then with hysteresis);
* a **CRM outcome** or an **ops action**: any move (:func:`check_move`), but a *backward* one needs a
  reason. Backward means down the funnel, into ``disqualified`` or ``recycled``, or out of
  ``disqualified``. Out of ``recycled`` into the funnel is forward (the lead re-engaged).
"""

from __future__ import annotations

from typing import Literal, get_args

from scoring.errors import ScoringError

__all__ = [
    "FUNNEL",
    "POLICY_STAGES",
    "QUALIFIED",
    "STAGES",
    "InvalidTransition",
    "Stage",
    "check_move",
    "is_backward",
    "rank",
]

Stage = Literal["subscriber", "lead", "mql", "sql", "opportunity", "customer", "disqualified", "recycled"]
STAGES: tuple[Stage, ...] = get_args(Stage)
FUNNEL: tuple[Stage, ...] = ("subscriber", "lead", "mql", "sql", "opportunity", "customer")
_RANK: dict[str, int] = {stage: i for i, stage in enumerate(FUNNEL)}
#: Stages a threshold policy may move a lead out of (and, except recycled, into).
POLICY_STAGES: frozenset[str] = frozenset({"subscriber", "lead", "mql", "sql", "recycled"})
#: Entering one of these is what downstream work (routing, CRM handoff) reacts to.
QUALIFIED: frozenset[str] = frozenset({"mql", "sql"})


class InvalidTransition(ScoringError):
    """A stage move that is not allowed (unknown stage, no change, or backward without a reason)."""


def rank(stage: str) -> int | None:
    """Position of ``stage`` in the funnel (``subscriber`` is 0, ``customer`` 5); ``None`` off it."""
    return _RANK.get(stage)


def is_backward(current: str, target: str) -> bool:
    """Whether moving from ``current`` to ``target`` goes back (see the module docstring)."""
    if target in ("disqualified", "recycled"):
        return True
    if current == "disqualified":
        return True
    if current == "recycled":
        return False
    current_rank, target_rank = _RANK[current], _RANK[target]
    return target_rank < current_rank


def check_move(current: str, target: str, *, reason: str | None) -> bool:
    """Check a move made by ops or reported by the CRM; returns whether it is backward.

    Raises :class:`InvalidTransition` for an unknown stage, a move to the stage the lead is already
    in, or a backward move without a non-blank ``reason``.
    """
    for stage in (current, target):
        if stage not in STAGES:
            raise InvalidTransition(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    if current == target:
        raise InvalidTransition(f"the lead is already in stage {target!r}")
    backward = is_backward(current, target)
    if backward and not (reason and reason.strip()):
        raise InvalidTransition(f"moving a lead back from {current!r} to {target!r} needs a reason")
    return backward
