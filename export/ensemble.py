"""Which ensembles an export joins, with which members and weights: the rules of ``--member``, ``--weight`` and
``--replace``.

* The export's ensemble is ``segment``, or E with ``--member E``.
* An ensemble that does not exist yet is created with the export as its only member (weight ``--weight``).
* An existing ensemble is extended only when asked: ``--member E`` adds the export to E with its weight (or,
  when it is a member already, sets its weight), keeping the other members and their weights. Without
  ``--member`` an existing ensemble is never merged into: re-exporting one of its members (``--replace``) keeps
  its members and weights, ``--replace`` otherwise makes the export its only member, and anything else is an
  error (exit 2), so a second model never joins the bundled ``segment`` by accident.
* Every other ensemble that the re-exported network belongs to is rewritten with the same members, so the
  contract it embeds names the new checkpoint.
* The members of an ensemble share their test spacings (a client runs the whole ensemble at each): an export that
  joins one with ``--member`` and no ``--test-spacings`` takes its members' (:func:`joined_test_spacings`).

The plan is made, and the new network's contract checked against every member it will be averaged with, before
any export work, so a refused export writes nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from mixsup.contract import CONTRACT_FILENAME, ModelContract
from mixsup.errors import InputError
from mixsup.repository import (
    DEFAULT_ENSEMBLE,
    RESERVED_SUFFIXES,
    VERSION,
    check_contracts_agree,
    check_model_name,
    list_ensembles,
    read_ensemble,
)

Members = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class EnsemblePlan:
    """An ensemble to (re)write after the export, with its members (network, weight) in order."""

    name: str
    members: Members


def check_weight(weight: float) -> None:
    """A member weight must be a positive finite number (the fuse step divides by the weights' sum)."""
    if not (math.isfinite(weight) and weight > 0):
        raise InputError(f"--weight must be a positive number, got {weight}")


def check_ensemble_name(ensemble: str, network: str) -> None:
    """An ensemble name that Triton accepts and that no entry of ``network`` or of the repository's own uses."""
    check_model_name(ensemble)
    if ensemble == network or ensemble.endswith(RESERVED_SUFFIXES) or ensemble == "fuse":
        raise InputError(f"--member {ensemble!r} would clash with a model of the repository; pick another ensemble "
                         "name")


def target_members(existing: Members | None, ensemble: str, network: str, weight: float, extend: bool,
                   replace: bool) -> Members:
    """The members of the export's own ensemble after the export (module docstring)."""
    if existing is None:
        return ((network, weight),)
    names = [name for name, _ in existing]
    if extend:
        if network in names:
            return tuple((name, weight if name == network else w) for name, w in existing)
        return (*existing, (network, weight))
    if network in names:
        return existing
    if replace:
        return ((network, weight),)
    raise InputError(f"ensemble {ensemble!r} already exists (members {', '.join(names)}); pass --member {ensemble} "
                     f"to add {network!r} to it, --replace to make {network!r} its only member, or --no-ensemble")


def plan_ensembles(repository: Path, network: str, contract: ModelContract, member: str | None, weight: float,
                   replace: bool, write: bool = True) -> list[EnsemblePlan]:
    """The ensembles to write once ``network`` (with ``contract``) is exported: its own (``--member`` or
    ``segment``), then every other one it belongs to. With ``write`` False (``--no-ensemble``) none is written,
    but the ensembles it already belongs to are still checked, since they will average the new network."""
    ensembles = list_ensembles(repository)
    plans = []
    if write:
        target = member or DEFAULT_ENSEMBLE
        check_ensemble_name(target, network)
        check_weight(weight)
        existing = tuple(ensembles[target]) if target in ensembles else read_ensemble(repository, target)
        plans.append(EnsemblePlan(target, target_members(existing, target, network, weight, member is not None,
                                                         replace)))
    for name, members in ensembles.items():
        if any(member_name == network for member_name, _ in members) and all(plan.name != name for plan in plans):
            plans.append(EnsemblePlan(name, tuple(members)))
    for plan in plans:
        others = [name for name, _ in plan.members if name != network]
        contracts = [ModelContract.load(repository / name / VERSION / CONTRACT_FILENAME) for name in others]
        check_contracts_agree([network, *others], [contract, *contracts])
    return plans


def joined_test_spacings(repository: Path, network: str, member: str | None) -> tuple[float, ...]:
    """The test spacings of the other members of ensemble ``member`` (none for no ``--member``, a new ensemble,
    or one whose only member is ``network`` itself)."""
    if member is None:
        return ()
    existing = read_ensemble(repository, member) or ()
    others = [name for name, _ in existing if name != network]
    if not others:
        return ()
    return ModelContract.load(repository / others[0] / VERSION / CONTRACT_FILENAME).test_spacings_mm
