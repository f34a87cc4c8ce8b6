"""Moving a powered-off VM to another host: its registration moves, its files stay (vCenter's
"change compute resource" of a powered-off VM; maintenance mode's ``--evacuate-powered-off``).

The destination must see every datastore the VM's files are on and have its networks, be
connected and not in maintenance, and no must rule may forbid the VM there. The destination
registers the VM from its record first, then the source forgets it: were the source to fail,
the destination forgets it again and nothing has changed. While it moves, the VM counts as
migrating (the inventory's refresh leaves it alone, and no migration of it starts). Recorded as
a "relocate" task, ended by the time the request returns.
"""

from __future__ import annotations

import logging

from kvmotion.center.db import Database, Host, Vm
from kvmotion.center.executor import Executor
from kvmotion.center.inventory import Inventory, host_view, vm_view
from kvmotion.center.rules import Rules
from kvmotion.center.tasks import TaskState, TaskStore, record_event
from kvmotion.errors import Conflict, InvalidInput, KvmotionError, PreconditionError
from kvmotion.host.protocol import vm_json
from kvmotion.migration.placement import registrable
from kvmotion.migration.precheck import Finding
from kvmotion.migration.rules import findings

log = logging.getLogger(__name__)


async def refusals(inventory: Inventory, rules: Rules, vm: Vm, dest: Host) -> list[Finding]:
    """Why ``dest`` cannot take the powered-off ``vm`` registered: its filters, then the must
    rules (empty if it can)."""
    if vm.host is not None and vm.host.name == dest.name:
        return [Finding("same_host", f"VM {vm.name} is already registered on {dest.name}")]
    hard, _ = findings(vm.name, dest.name, await rules.all(), await rules.where())
    return [*registrable(vm_view(vm, False), host_view(dest)), *hard]


async def relocate(
    db: Database,
    inventory: Inventory,
    executor: Executor,
    tasks: TaskStore,
    rules: Rules,
    vm_ref: str,
    dest_name: str,
) -> int:
    """Register the powered-off VM on ``dest_name`` instead of its host; returns the task id.
    Raises PreconditionError (the destination cannot take it, with every reason), Conflict
    (it is not powered off, or already moving), InvalidInput (already there)."""
    vm = await inventory.vm(vm_ref)
    if vm.host is None:
        raise Conflict(f"VM {vm.name} is on no known host", code="no_host")
    if vm.power_state != "poweredOff":
        raise Conflict(
            f"VM {vm.name} is {vm.power_state}: only a powered-off VM is moved by registering it "
            "on another host (a running one is live-migrated)",
            code="wrong_state",
        )
    source = vm.host
    dest = await inventory.fresh_facts(dest_name, unreachable_ok=True)
    if dest.name == source.name:
        raise InvalidInput(f"VM {vm.name} is already registered on {dest.name}")
    with executor.reserved(vm.name):
        errors = await refusals(inventory, rules, vm, dest)
        if errors:
            raise PreconditionError(
                "; ".join(e.message for e in errors), code=errors[0].code,
                errors=[e.__dict__ for e in errors],
            )  # fmt: skip
        task = await tasks.create(
            "relocate", vm.name, {"type": "relocate", "vm": vm.name, "source": source.name,
                                  "dest": dest.name},
        )  # fmt: skip
        await tasks.update(task.id, state=TaskState.RUNNING, phase="registering")
        try:
            async with inventory.agent(dest) as agent:
                info = await agent.register_vm(vm.config, vm.config_path)
            try:
                async with inventory.agent(source) as agent:
                    await agent.unregister_vm(vm.uuid)
            except KvmotionError:
                async with inventory.agent(dest) as agent:
                    await agent.unregister_vm(vm.uuid)
                raise
        except KvmotionError as exc:
            await tasks.update(task.id, state=TaskState.ERROR, error=exc.message,
                               error_code=exc.code)  # fmt: skip
            raise
        await inventory.upsert_vm(vm_json(info), dest)
        await tasks.update(task.id, state=TaskState.SUCCESS, phase="registered", progress=100.0)
        await record_event(
            db, f"powered-off VM {vm.name} moved from {source.name} to {dest.name} "
            "(registered there; its files stay)", vm=vm.name, host=dest.name,
        )  # fmt: skip
        log.info("relocated powered-off %s: %s -> %s", vm.name, source.name, dest.name)
        return task.id
