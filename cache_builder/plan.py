"""The build plan: a pure function from what ``--out`` holds and the cache intended to what a build does there
(create, resume, replace or refuse, with the command to run instead), and the split of pending units into groups."""
from __future__ import annotations

from dataclasses import dataclass

from shared.cache_schema import CACHE_FORMAT, STATUS_COMPLETE, CacheAttrs


def rank_share(units: list, rank: int, world: int) -> list:
    """Rank ``rank``'s contiguous share (±1) of ``units``: every rank computes the same split of the same list."""
    return units[rank * len(units) // world:(rank + 1) * len(units) // world]


def group_units(units: list[tuple[int, int]]) -> list[tuple[int, list[int]]]:
    """[(chunk, view)] in chunk order -> [(chunk, [views])]: a worker reads a chunk's rows once for all its views."""
    groups: list[tuple[int, list[int]]] = []
    for c, v in units:
        if groups and groups[-1][0] == c:
            groups[-1][1].append(v)
        else:
            groups.append((c, [v]))
    return groups


@dataclass
class BuildPlan:
    """What a build does at ``--out``: ``create`` | ``resume`` | ``replace`` | ``refuse`` (``reason`` says why and what
    to run instead; growing a complete cache is ``cit cache extend`` / ``add-teacher``)."""
    action: str
    reason: str = ""


def plan_build(state: str, existing: CacheAttrs | None, intended: CacheAttrs, force: bool, out: str) -> BuildPlan:
    """Pure: the action from what ``out`` holds (``inspect_out``) and the cache intended."""
    if state == "foreign":
        return BuildPlan("refuse", f"--out {out} already holds something that is not a cit cache; refusing to touch "
                                   "it (choose another location or delete it yourself)")
    if state == "old format":
        return BuildPlan("replace") if force else BuildPlan(
            "refuse", f"--out {out} holds a cit cache of an older format (this cit writes format {CACHE_FORMAT}); "
                      "pass --force to rebuild it there, or choose another --out")
    if state in ("absent", "empty"):
        return BuildPlan("create")
    if force:
        return BuildPlan("replace")
    if existing.growth:
        return BuildPlan("refuse", f"--out {out} is being changed by `cit cache {existing.growth.get('op')}` "
                                   "(interrupted or running); rerun that command to finish it, or pass --force to "
                                   "rebuild the cache")
    diff = existing.identity_diff(intended)
    if not diff:
        return BuildPlan("resume")
    grow = _growth_hint(existing, intended, out)
    return BuildPlan("refuse", f"--out {out} already holds a different cache ({'; '.join(diff[:4])}); "
                               + (grow or "pass --force to replace it, or choose another --out"))


def _growth_hint(existing: CacheAttrs, intended: CacheAttrs, out: str) -> str:
    """When the intended cache only adds views or teachers to a complete one: the command that grows it."""
    if existing.status != STATUS_COMPLETE:
        return ""
    if existing.identity_diff(intended, ignore=("views", "teachers")):
        return ""
    a, b = existing.identity(), intended.identity()
    if a["teachers"] == b["teachers"] and b["views"] > a["views"]:
        return (f"to add views without recomputing the others: `cit cache extend {out} --views {b['views']} --data "
                "MANIFEST` (or --force to rebuild it)")
    if a["views"] == b["views"] and b["teachers"][:len(a["teachers"])] == a["teachers"]:
        new = [t.name for t in intended.teachers[len(existing.teachers):]]
        return (f"to add teachers without recomputing the others: `cit cache add-teacher {out} "
                f"{' '.join(n + '=CHECKPOINT' for n in new)} --data MANIFEST` (or --force to rebuild it)")
    return ""
