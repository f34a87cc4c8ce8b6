"""A live migration as it is seen from outside: QEMU's figures (``query-migrate``), one sample per
pre-copy pass, and the view of one side (:class:`MigrationView`) that the agent reports and the
center reads, and the mode both sides are set to alike. The sides that drive it are in
:mod:`kvmotion.host.migration` and :mod:`kvmotion.host.incoming`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvmotion.errors import Conflict, QemuError

ANNOUNCE = {"initial": 50, "max": 550, "rounds": 5, "step": 100}
ACTIVE = (
    "setup",
    "active",
    "pre-switchover",
    "device",
    "postcopy-active",
    "cancelling",
    "wait-unplug",
)
FINAL = ("completed", "failed", "cancelled")
# Post-copy whose stream broke: the guest runs on the destination but waits on every page still
# on the source, until the stream is recovered (migrate-recover, migrate with resume).
POSTCOPY_PAUSED = ("postcopy-paused", "postcopy-recover-setup", "postcopy-recover")


@dataclass(frozen=True)
class MigrationStats:
    """``query-migrate`` parsed once: the numbers a task shows."""

    status: str
    total_time_ms: int | None = None
    setup_time_ms: int | None = None
    downtime_ms: int | None = None
    expected_downtime_ms: int | None = None
    transferred_bytes: int = 0
    multifd_bytes: int = 0  # of those, what went over the multifd streams
    remaining_bytes: int = 0
    total_bytes: int = 0
    dirty_pages_rate: int = 0  # pages/s
    page_size: int = 4096
    mbps: float = 0.0
    passes: int = 0  # dirty-sync-count
    throttle_pct: int = 0
    error: str | None = None

    @classmethod
    def parse(cls, reply: dict[str, Any]) -> MigrationStats:
        ram = reply.get("ram", {})
        return cls(
            status=str(reply.get("status", "none")),
            total_time_ms=reply.get("total-time"),
            setup_time_ms=reply.get("setup-time"),
            downtime_ms=reply.get("downtime"),
            expected_downtime_ms=reply.get("expected-downtime"),
            transferred_bytes=int(ram.get("transferred", 0)),
            multifd_bytes=int(ram.get("multifd-bytes", 0)),
            remaining_bytes=int(ram.get("remaining", 0)),
            total_bytes=int(ram.get("total", 0)),
            dirty_pages_rate=int(ram.get("dirty-pages-rate", 0)),
            page_size=int(ram.get("page-size", 4096)),
            mbps=float(ram.get("mbps", 0.0)),
            passes=int(ram.get("dirty-sync-count", 0)),
            throttle_pct=int(reply.get("cpu-throttle-percentage", 0)),
            error=reply.get("error-desc"),
        )

    @property
    def dirty_rate_bps(self) -> int:
        return self.dirty_pages_rate * self.page_size


@dataclass
class PassSample:
    """One pre-copy pass as the source saw it (seconds since the migration started)."""

    t: float
    pass_no: int
    transferred_bytes: int
    remaining_bytes: int
    dirty_rate_bps: int
    throughput_bps: float
    expected_downtime_ms: int | None
    throttle_pct: int


@dataclass
class MigrationView:
    """What a host reports about a VM's migration: side, phase, samples, marks."""

    side: str  # "source" or "destination"
    phase: str  # QEMU's status, or our own: "listening", "resumed", "failed", "aborted"
    uri: str | None = None
    stats: MigrationStats | None = None
    samples: list[PassSample] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)  # wall-clock times of steps
    error: str | None = None
    knobs: dict[str, Any] = field(default_factory=dict)  # what the source runs with now
    # Destination: how far the guest's clock was off after the resume, set right by its guest
    # agent (host now minus guest, seconds); None: not corrected (no agent answered)
    guest_clock_step_s: float | None = None


def uri_host(uri: str) -> str:
    """The host of a ``tcp:HOST:PORT`` migration URI (``tcp:[v6]:PORT`` too)."""
    _, _, rest = uri.partition(":")
    host, _, _ = rest.rpartition(":")
    return host.strip("[]")


def throttle_params(pct: int) -> dict[str, int]:
    """QEMU 7.2 parameters that hold the CPU throttle at ``pct`` % (1 % is its floor): the
    throttle rises by ``increment`` at each fast-dirtying pass, capped at ``max-cpu-throttle``."""
    pct = max(1, min(99, pct))
    return {"cpu-throttle-initial": pct, "cpu-throttle-increment": 99, "max-cpu-throttle": pct}


MAX_STREAMS = 16
# Of the link, what post-copy's background copy may take (measured: tests/lab/test_postcopy.py,
# a full link left the guest waiting seconds on each page it faulted on)
POSTCOPY_SHARE = 0.75
PREEMPT_SINCE = (8, 0)  # QEMU's postcopy-preempt channel as it is now (its handshake changed)


@dataclass(frozen=True)
class MigrationMode:
    """How memory travels, set alike on both ends before the stream starts.

    ``streams`` > 1 sends memory over that many TCP streams (QEMU's multifd: one thread a stream
    on each end, so the destination's first touch of fresh memory, which bounds a copy under
    TCG, runs in parallel too); ``postcopy`` lets the source switch to post-copy. QEMU 10 refuses
    the two together, and 7.2 does not support them together. ``preempt`` (with post-copy only)
    sends the pages the running guest waits for over a second stream, ahead of the background
    copy (QEMU 8.0 and later on both ends: the channel's handshake changed in 8.0).
    """

    postcopy: bool = False
    streams: int = 1
    preempt: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.streams <= MAX_STREAMS:
            raise ValueError(f"streams must be 1 to {MAX_STREAMS}, not {self.streams}")
        if self.postcopy and self.streams > 1:
            raise ValueError("post-copy runs over one stream: QEMU cannot combine it with multifd")
        if self.preempt and not self.postcopy:
            raise ValueError("postcopy-preempt needs post-copy")

    def capabilities(self) -> list[tuple[str, bool]]:
        # Every one named, on or off: a QEMU keeps what its last migration set (a VM received by
        # post-copy with preempt would refuse its next migration without post-copy).
        return [
            ("postcopy-ram", self.postcopy),
            ("multifd", self.streams > 1),
            ("postcopy-preempt", self.preempt),
        ]

    def parameters(self) -> dict[str, Any]:
        return {"multifd-channels": self.streams} if self.streams > 1 else {}


def capabilities_arg(capabilities: list[tuple[str, bool]]) -> dict[str, Any]:
    """``migrate-set-capabilities``'s argument for (name, on) pairs."""
    return {"capabilities": [{"capability": c, "state": on} for c, on in capabilities]}


def listening_port(info: dict[str, Any]) -> int | str:
    """The port a destination QEMU listens on, from its ``query-migrate``."""
    ports = [a["port"] for a in info.get("socket-address", []) if "port" in a]
    if not ports:
        raise QemuError(f"destination QEMU did not report where it listens: {info}")
    return ports[0]  # type: ignore[no-any-return]


def require_phase(view: MigrationView, phases: tuple[str, ...], what: str) -> None:
    """Raise Conflict unless the migration is in one of ``phases`` (``what`` names them)."""
    if view.phase not in phases:
        raise Conflict(f"the migration is {view.phase}, not {what}", code="wrong_state")
