"""HA's decisions, pure: what state a host is in, which of its VMs may be restarted elsewhere and
in which order, and the room admission control keeps for failed hosts.

A host's **state** comes from two channels (host/ha.py has how each is kept):

- *connected*: it answered the center's last heartbeat;
- *not responding*: silent, for less than ``failure_s``, or longer but no other host shares a
  datastore with it, so that nothing can tell a failed host from an isolated one (nothing is
  restarted then);
- *isolated*: silent for ``failure_s``, but another host still sees its heartbeat file change on
  a datastore: it runs, cut off from the center; its VMs are left to its isolation response;
- *failed*: silent for ``failure_s`` on the management network *and* its heartbeat file unchanged
  for ``failure_s`` on the datastores other hosts watch.

A datastore heartbeat's age is the freshest view of the healthy observers (hosts whose own
heartbeat there was just renewed: one that cannot reach the datastore sees everyone as stale).
A VM's **lease** on a datastore lapsed when its host's heartbeat there is ``failure_s`` old; the
host fenced it ``FENCE_MARGIN_S`` before (host/ha.py). A VM of a failed host may be restarted
once its lease lapsed on every datastore of its disks; a VM its isolated host *released* (its
isolation response stopped it, or its fence did while the host kept talking to the center) may
be restarted at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

CONNECTED, NOT_RESPONDING, ISOLATED, FAILED = "connected", "not responding", "isolated", "failed"
PRIORITIES = ("high", "medium", "low", "disabled")  # a VM's restart priority; medium by default
OBSERVER_FRESH_S = 3.0  # an observer counts if its own heartbeat there is at most this old


@dataclass(frozen=True)
class Sighting:
    """One host's file on one datastore, as another (healthy) host reads it."""

    observer: str
    age_s: float  # since the observer saw it change
    vms: tuple[str, ...] = ()
    released: tuple[str, ...] = ()


@dataclass(frozen=True)
class Signals:
    """All the center knows of one host's health now."""

    host: str
    silent_s: float  # since it last answered the center's heartbeat (0: it just did)
    datastores: frozenset[str]  # the shared datastores it mounts
    sightings: Mapping[str, tuple[Sighting, ...]] = field(default_factory=dict)  # by datastore
    released: frozenset[str] = frozenset()  # what it said itself it stopped (fence, isolation)


@dataclass(frozen=True)
class Verdict:
    host: str
    state: str
    reason: str
    heartbeat_age_s: dict[str, float]  # by watched datastore: the freshest observer's age
    lapsed: frozenset[str]  # datastores where its leases lapsed
    released: frozenset[str]  # uuids its isolation response stopped
    leased: frozenset[str]  # uuids its files last said it ran

    def may_restart(self, disk_datastores: Iterable[str], uuid: str) -> bool:
        """May this host's VM (its disks on these datastores) be restarted elsewhere now?"""
        if uuid in self.released:
            return True
        stores = set(disk_datastores)
        return self.state == FAILED and bool(stores) and stores <= self.lapsed


def judge(signals: Signals, failure_s: float) -> Verdict:
    ages = {
        ds: min(s.age_s for s in seen)
        for ds, seen in signals.sightings.items()
        if seen and ds in signals.datastores
    }
    released = signals.released | {
        u for seen in signals.sightings.values() for s in seen for u in s.released
    }
    leased = frozenset(u for seen in signals.sightings.values() for s in seen for u in s.vms)
    lapsed = frozenset(ds for ds, age in ages.items() if age >= failure_s)
    alive = sorted(ds for ds, age in ages.items() if age < failure_s)

    def verdict(state: str, reason: str) -> Verdict:
        return Verdict(signals.host, state, reason, ages, lapsed, released, leased)

    silent = signals.silent_s
    if silent <= 0:
        return verdict(CONNECTED, "answers the center's heartbeat")
    if silent < failure_s:
        return verdict(NOT_RESPONDING, f"no answer to the center's heartbeat for {silent:.0f} s")
    if alive:
        shown = ", ".join(f"{ds} ({ages[ds]:.0f} s)" for ds in alive)
        return verdict(
            ISOLATED,
            f"no answer to the center for {silent:.0f} s, but its datastore heartbeat lives "
            f"on {shown}: it runs cut off from the center; its VMs are left to its isolation "
            "response",
        )
    if lapsed:
        shown = ", ".join(f"{ds} ({ages[ds]:.0f} s)" for ds in sorted(lapsed))
        return verdict(
            FAILED,
            f"no answer to the center for {silent:.0f} s and its datastore heartbeat stopped "
            f"on {shown}",
        )
    return verdict(
        NOT_RESPONDING,
        f"no answer to the center for {silent:.0f} s, and no other host watches a datastore "
        "it mounts: a failure cannot be told from an isolation, so nothing is restarted",
    )


def healthy_observer(written_age_s: float | None) -> bool:
    """Does a host's own heartbeat on a datastore, this old, make it a fair judge of the
    others' there?"""
    return written_age_s is not None and written_age_s <= OBSERVER_FRESH_S


def restart_order(vms: Iterable[tuple[str, str | None]]) -> list[str]:
    """VM names (with their priority, None for the default) in the order HA restarts them:
    high, medium, low; disabled ones never."""
    rank = {p: i for i, p in enumerate(PRIORITIES)}
    chosen = [(rank[p or "medium"], name) for name, p in vms if (p or "medium") != "disabled"]
    return [name for _, name in sorted(chosen)]


@dataclass(frozen=True)
class Reserve:
    """Admission control's arithmetic: room kept for ``failures`` hosts to fail (the largest,
    by memory), so that their VMs can be restarted on the others."""

    failures: int
    hosts: int
    total_mib: int  # the members' memory (connected, not in maintenance)
    reserved_mib: int  # the largest ``failures`` hosts' memory
    used_mib: int  # the powered-on VMs' memory

    @property
    def usable_mib(self) -> int:
        return self.total_mib - self.reserved_mib

    def refusal(self, vm: str, memory_mib: int) -> str | None:
        """Why powering ``vm`` on would break the reserve, or None if it would not."""
        if self.failures == 0 or self.used_mib + memory_mib <= self.usable_mib:
            return None
        if self.failures >= self.hosts:
            return (
                f"powering on {vm} is refused by HA admission control: the cluster has "
                f"{self.hosts} usable host(s) and must tolerate {self.failures} failure(s), "
                "which leaves none to restart VMs on (add hosts or tolerate fewer failures)"
            )
        return (
            f"powering on {vm} ({memory_mib} MiB) is refused by HA admission control: powered-on "
            f"VMs use {self.used_mib} MiB, and {self.usable_mib} MiB is usable while the "
            f"largest {self.failures} host(s) ({self.reserved_mib} MiB) are kept free for "
            "failures (power something off, add a host, or tolerate fewer failures)"
        )

    def as_dict(self) -> dict[str, int]:
        return {
            "failures": self.failures, "hosts": self.hosts, "total_mib": self.total_mib,
            "reserved_mib": self.reserved_mib, "usable_mib": self.usable_mib,
            "used_mib": self.used_mib,
        }  # fmt: skip


def reserve(host_memory_mib: Iterable[int], used_mib: int, failures: int) -> Reserve:
    sizes = sorted(host_memory_mib, reverse=True)
    return Reserve(failures, len(sizes), sum(sizes), sum(sizes[:failures]), used_mib)
