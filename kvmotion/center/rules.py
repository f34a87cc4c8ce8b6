"""The center's placement rules (what they mean: migration/rules.py): stored, checked when added
(a rule no placement could keep with the others is refused, naming them), and each one's state
now (kept, or broken by which VMs where)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from kvmotion.center.db import Database, PlacementRule
from kvmotion.center.inventory import Inventory
from kvmotion.center.tasks import record_event
from kvmotion.errors import Conflict, InvalidInput, NotFound
from kvmotion.migration.rules import Rule, check, conflicts, findings


def as_rule(row: PlacementRule) -> Rule:
    return Rule(row.name, row.kind, frozenset(row.vms), frozenset(row.hosts), row.must)


class Rules:
    def __init__(self, db: Database, inventory: Inventory) -> None:
        self.db, self.inventory = db, inventory

    async def all(self) -> list[Rule]:
        async with self.db.session() as s:
            return [as_rule(r) for r in await s.scalars(select(PlacementRule))]

    async def add(self, rule: Rule) -> Rule:
        """Raises InvalidInput (a rule that makes no sense), NotFound (an unknown VM or host),
        Conflict (its name is taken, or it contradicts must rules: named)."""
        try:
            check(rule)
        except ValueError as exc:
            raise InvalidInput(str(exc), code="invalid_rule") from exc
        for vm in rule.vms:
            await self.inventory.vm(vm)
        for host in rule.hosts:
            await self.inventory.host(host)
        existing = await self.all()
        if any(r.name == rule.name for r in existing):
            raise Conflict(f"a rule named {rule.name!r} exists", code="rule_exists")
        problems = conflicts(rule, existing)
        if problems:
            raise Conflict(
                f"{rule.describe()} contradicts: " + "; ".join(problems), code="rule_conflict"
            )
        async with self.db.session() as s:
            s.add(PlacementRule(name=rule.name, kind=rule.kind, vms=sorted(rule.vms),
                                hosts=sorted(rule.hosts), must=rule.must))  # fmt: skip
            await s.commit()
        await record_event(self.db, f"{rule.describe()} added")
        return rule

    async def delete(self, name: str) -> None:
        async with self.db.session() as s:
            row = await s.scalar(select(PlacementRule).where(PlacementRule.name == name))
            if row is None:
                raise NotFound(f"no rule {name[:80]!r}", code="rule_not_found")
            await s.delete(row)
            await s.commit()
        await record_event(self.db, f"rule {name} deleted")

    async def where(self) -> dict[str, str]:
        """The host each running VM is on."""
        return await self.inventory.running_on()

    async def states(self) -> list[dict[str, Any]]:
        """Each rule, and what breaks it now (running VMs only)."""
        where = await self.where()
        out = []
        for rule in await self.all():
            broken: set[str] = set()
            for vm in rule.vms & where.keys():
                hard, soft = findings(vm, where[vm], [rule], where)
                broken.update(f.message for f in (*hard, *soft))
            out.append(
                {
                    "name": rule.name,
                    "kind": rule.kind,
                    "vms": sorted(rule.vms),
                    "hosts": sorted(rule.hosts),
                    "must": rule.must,
                    "description": rule.describe(),
                    "kept": not broken,
                    "broken": sorted(broken),
                }
            )
        return out
