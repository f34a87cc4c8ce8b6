"""Network namespaces, veths, bridges, routes and ``tc``, plus sockets and processes inside them.

This is the lab's edge with the kernel: links are managed by running iproute2's ``ip`` and ``tc``
(and ``sysctl``), and every failure (non-zero exit, timeout, missing tool) becomes a
:class:`~kvmotion.errors.LabError` naming the command and its stderr. Nothing here knows the lab's
address plan; :mod:`kvmotion.lab.topology` does.

A namespace argument ``ns`` of ``None`` means the caller's own namespace (the "root" namespace).

Python 3.11 has no ``os.setns``: :func:`socket_in_netns` enters a namespace with libc ``setns`` in a
short-lived thread (a network namespace is per thread), creates the socket there and lets the
thread end. The socket stays in that namespace for life and works from any thread.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kvmotion.errors import InvalidInput, LabError

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
COMMAND_TIMEOUT = 30.0

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)
# Daemons this process started, kept so that they are reaped (no zombies, no ResourceWarning).
_children: dict[int, subprocess.Popen[bytes]] = {}


# --- commands -------------------------------------------------------------------------------


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = COMMAND_TIMEOUT,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command and capture its output; raises LabError if it fails and ``check``."""
    log.debug("run %s", " ".join(argv))
    try:
        proc = subprocess.run(
            list(argv),
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=None if input_text is not None else subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"command {' '.join(argv)!r} failed: {exc}", argv=list(argv)) from exc
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise LabError(
            f"command {' '.join(argv)!r} exited {proc.returncode}: {detail}",
            argv=list(argv),
            returncode=proc.returncode,
        )
    return proc


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip [-n ns] args``."""
    prefix = ["ip"] if ns is None else ["ip", "-n", ns]
    return run([*prefix, *args], check=check)


def ip_json(*args: str, ns: str | None = None) -> list[dict[str, Any]]:
    """Run ``ip -j [-n ns] args`` and parse its JSON (an empty output is an empty list)."""
    prefix = ["ip", "-j"] if ns is None else ["ip", "-j", "-n", ns]
    out = run([*prefix, *args]).stdout.strip()
    if not out:
        return []
    try:
        data = json.loads(out)
    except ValueError as exc:
        raise LabError(f"cannot parse output of ip {' '.join(args)}: {exc}") from exc
    if not isinstance(data, list):
        raise LabError(f"unexpected output of ip {' '.join(args)}: {out[:200]}")
    return [item for item in data if isinstance(item, dict)]


def tc(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``tc [-n ns] args``."""
    prefix = ["tc"] if ns is None else ["tc", "-n", ns]
    return run([*prefix, *args], check=check)


def run_in_netns(
    ns: str,
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = COMMAND_TIMEOUT,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside namespace ``ns`` (``ip netns exec``); raises LabError on failure."""
    _require_netns(ns)
    argv = ["ip", "netns", "exec", ns, *argv]
    return run(argv, check=check, timeout=timeout, input_text=input_text)


def popen_in_netns(
    ns: str,
    argv: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> int:
    """Start a long-lived daemon inside ``ns``, detached (own session), output to ``log_path``.

    Returns its pid (``ip netns exec`` execs the command, so the pid is the daemon's own).
    Raises LabError if the namespace is missing or the process cannot be started.
    """
    _require_netns(ns)
    full = ["ip", "netns", "exec", ns, *argv]
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                env=None if env is None else dict(env),
                cwd=cwd,
            )
    except OSError as exc:
        raise LabError(f"cannot start {' '.join(full)!r}: {exc}") from exc
    _children[proc.pid] = proc
    log.debug("started pid %d in %s: %s", proc.pid, ns, " ".join(argv))
    return proc.pid


def adopt_child(proc: subprocess.Popen[bytes]) -> None:
    """Track a daemon this process started elsewhere, so that pid_alive reaps it."""
    _children[proc.pid] = proc


# --- processes ------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie counts as dead; our own children are reaped here)."""
    child = _children.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _children[pid]
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def process_start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (a guard against pid reuse), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime); fields after the ")" that closes comm start at field 3.
    return int(stat.rsplit(")", 1)[-1].split()[19])


def process_cmdline(pid: int) -> list[str]:
    """The argv of ``pid`` (empty if it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def terminate(pid: int, *, grace: float = 5.0) -> bool:
    """SIGTERM ``pid``, wait up to ``grace`` seconds, then SIGKILL. True if it is gone.

    The caller has checked that ``pid`` is the process it means (start ticks or cmdline).
    """
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        if not pid_alive(pid):
            return True
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        except OSError as exc:
            raise LabError(f"cannot signal pid {pid}: {exc}") from exc
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return True
            time.sleep(0.05)
    return not pid_alive(pid)


# --- namespaces -----------------------------------------------------------------------------


def list_netns() -> list[str]:
    """Names of the named network namespaces (``/run/netns``)."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise LabError(f"cannot list {NETNS_DIR}: {exc}") from exc


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def _require_netns(name: str) -> None:
    if not netns_exists(name):
        raise LabError(f"network namespace {name} does not exist (is the lab up?)", netns=name)


def add_netns(name: str) -> bool:
    """Create namespace ``name`` unless it exists; True if it was created."""
    if netns_exists(name):
        return False
    ip("netns", "add", name)
    return True


def delete_netns(name: str) -> None:
    """Delete namespace ``name`` (and with it every link inside it); a no-op if it is gone."""
    if netns_exists(name):
        ip("netns", "delete", name)


def netns_pids(name: str) -> list[int]:
    """Pids of the processes inside namespace ``name``."""
    if not netns_exists(name):
        return []
    out = ip("netns", "pids", name, check=False).stdout
    return [int(word) for word in out.split() if word.isdigit()]


def sysctl(settings: Mapping[str, str], *, ns: str | None = None) -> None:
    """Set kernel parameters (``key=value``) in ``ns``."""
    argv = ["sysctl", "-q", "-w", *(f"{key}={value}" for key, value in settings.items())]
    if ns is None:
        run(argv)
    else:
        run_in_netns(ns, argv)


def ipv6_available() -> bool:
    return Path("/proc/sys/net/ipv6").exists()


def disable_ipv6(*, ns: str | None = None, link: str | None = None) -> None:
    """Turn IPv6 off for a whole namespace (``link`` None) or one link, so that nothing (router
    solicitations, DAD) is ever sent."""
    if not ipv6_available():
        return
    if link is None:
        keys = ["net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.default.disable_ipv6"]
    else:
        keys = [f"net.ipv6.conf.{link}.disable_ipv6"]
    sysctl(dict.fromkeys(keys, "1"), ns=ns)


def ensure_kernel_modules(modules: Sequence[str] = ("bridge", "veth", "sch_tbf")) -> None:
    """Best-effort ``modprobe`` of modules that are not loaded; built-ins need nothing, and a real
    absence shows up as a clear ``ip link add`` error later."""
    for module in modules:
        if not Path(f"/sys/module/{module}").exists():
            run(["modprobe", "-q", module], check=False)


# --- links ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkInfo:
    name: str
    kind: str | None
    master: str | None
    flags: frozenset[str]

    @property
    def up(self) -> bool:
        """Administratively up and with carrier (for a veth: its peer is up too)."""
        return "UP" in self.flags and "LOWER_UP" in self.flags


def links(ns: str | None = None) -> dict[str, LinkInfo]:
    """Every link in ``ns`` by name."""
    result: dict[str, LinkInfo] = {}
    for item in ip_json("-d", "link", "show", ns=ns):
        linkinfo = item.get("linkinfo")
        kind = linkinfo.get("info_kind") if isinstance(linkinfo, dict) else None
        name = str(item.get("ifname", ""))
        result[name] = LinkInfo(
            name=name,
            kind=str(kind) if kind is not None else None,
            master=str(item["master"]) if "master" in item else None,
            flags=frozenset(str(flag) for flag in item.get("flags", [])),
        )
    return result


def link_exists(name: str, ns: str | None = None) -> bool:
    return ip("link", "show", "dev", name, ns=ns, check=False).returncode == 0


def add_veth(name: str, peer: str, *, ns: str | None, peer_ns: str | None) -> None:
    """Create veth ``name`` in ``ns`` with its ``peer`` there too, then move the peer to
    ``peer_ns`` (None: the caller's namespace)."""
    ip("link", "add", "name", name, "type", "veth", "peer", "name", peer, ns=ns)
    if peer_ns != ns:
        target = str(os.getpid()) if peer_ns is None else peer_ns
        ip("link", "set", "dev", peer, "netns", target, ns=ns)


def add_bridge(name: str, ns: str | None) -> None:
    """Create bridge ``name`` (STP off, forward delay 0), or reset those options if it exists."""
    options = ["stp_state", "0", "forward_delay", "0"]
    if link_exists(name, ns):
        ip("link", "set", "dev", name, "type", "bridge", *options, ns=ns)
    else:
        ip("link", "add", "name", name, "type", "bridge", *options, ns=ns)


def delete_link(name: str, ns: str | None = None) -> None:
    """Delete link ``name`` (a veth takes its peer with it); a no-op if it is gone."""
    if link_exists(name, ns):
        ip("link", "delete", "dev", name, ns=ns)


def set_master(name: str, bridge: str, ns: str | None) -> None:
    ip("link", "set", "dev", name, "master", bridge, ns=ns)


def set_up(name: str, ns: str | None) -> None:
    ip("link", "set", "dev", name, "up", ns=ns)


def replace_address(name: str, cidr: str, ns: str | None) -> None:
    ip("address", "replace", cidr, "dev", name, ns=ns)


def delete_address(name: str, cidr: str, ns: str | None) -> None:
    ip("address", "delete", cidr, "dev", name, ns=ns, check=False)


def replace_unreachable_route(cidr: str, *, metric: int, ns: str | None = None) -> None:
    """Make ``cidr`` unreachable at ``metric`` (idempotent); a connected route wins over it."""
    ip("route", "replace", "unreachable", cidr, "metric", str(metric), ns=ns)


def has_unreachable_route(cidr: str, *, metric: int, ns: str | None = None) -> bool:
    for route in ip_json("route", "show", "table", "main", "type", "unreachable", ns=ns):
        if route.get("dst") == cidr and route.get("metric") == metric:
            return True
    return False


# --- tc -------------------------------------------------------------------------------------


def root_qdisc(dev: str, ns: str | None) -> dict[str, Any] | None:
    """The root qdisc of ``dev`` as ``tc -j`` reports it, or None."""
    out = tc("-j", "qdisc", "show", "dev", dev, "root", ns=ns).stdout.strip()
    try:
        items = json.loads(out) if out else []
    except ValueError as exc:
        raise LabError(f"cannot parse tc output for {dev}: {exc}") from exc
    for item in items:
        if isinstance(item, dict) and item.get("root"):
            return item
    return None


def set_rate(dev: str, ns: str | None, rate_mbit: float) -> None:
    """Shape ``dev``'s egress to ``rate_mbit`` with a token bucket filter."""
    if not rate_mbit > 0:
        raise InvalidInput(f"link rate must be positive, not {rate_mbit} Mbit/s")
    rate_bits = int(rate_mbit * 1_000_000)
    # Bucket: 10 ms at full rate but at least 32 KiB, so a 64 KiB GSO packet is segmented, not
    # dropped, and the kernel timer granularity never caps the rate.
    burst = max(32 * 1024, rate_bits // 8 // 100)
    tbf = ["tbf", "rate", f"{rate_bits}bit", "burst", str(burst), "latency", "100ms"]
    tc("qdisc", "replace", "dev", dev, "root", *tbf, ns=ns)


def clear_rate(dev: str, ns: str | None) -> None:
    """Remove any shaping from ``dev`` (back to the default qdisc)."""
    qdisc = root_qdisc(dev, ns)
    if qdisc is not None and qdisc.get("kind") in ("tbf", "htb"):
        tc("qdisc", "delete", "dev", dev, "root", ns=ns)


def rate_mbit(dev: str, ns: str | None) -> float | None:
    """The rate ``dev`` is shaped to, in Mbit/s, or None if it is not shaped by tbf."""
    qdisc = root_qdisc(dev, ns)
    if qdisc is None or qdisc.get("kind") != "tbf":
        return None
    options = qdisc.get("options", {})
    rate = options.get("rate") if isinstance(options, dict) else None
    return float(rate) * 8 / 1_000_000 if isinstance(rate, int | float) else None


# --- sockets --------------------------------------------------------------------------------


def _in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Call ``fn`` in a fresh thread that has entered namespace ``ns``; the thread then ends."""
    results: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(NETNS_DIR / ns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            errors.append(LabError(f"cannot open network namespace {ns}: {exc}", netns=ns))
            return
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                errors.append(LabError(f"setns({ns}) failed: {os.strerror(err)}", netns=ns))
                return
        finally:
            os.close(fd)
        try:
            results.append(fn())
        except BaseException as exc:  # handed to the calling thread below
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{ns}", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


def socket_in_netns(
    ns: str | None,
    family: int = socket.AF_INET,
    type: int = socket.SOCK_STREAM,
    proto: int = 0,
) -> socket.socket:
    """A new socket living in namespace ``ns`` (None: this one). Raises LabError if the
    namespace cannot be entered."""
    if ns is None:
        return socket.socket(family, type, proto)
    return _in_netns(ns, lambda: socket.socket(family, type, proto))


def connect_in_netns(ns: str | None, host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection from namespace ``ns`` to ``host:port`` (socket timeout ``timeout``).

    Raises LabError if the namespace cannot be entered, and the OSError of ``connect`` as is
    (refused, unreachable, TimeoutError), since callers commonly retry those. Routing follows
    the socket's namespace, so connecting from the calling thread is correct.
    """
    sock = socket_in_netns(ns, socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(address: str, *, ns: str | None = None, timeout: float = 1.0) -> bool:
    """Send one ICMP echo from ``ns`` to ``address``; True if it is answered within ``timeout``.

    A local routing refusal (unreachable route) is False at once, with nothing sent.
    """
    ident = (os.getpid() ^ threading.get_ident()) & 0xFFFF
    seq = 1
    payload = b"kvmotion-lab-ping"
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    checksum = _icmp_checksum(header + payload)
    packet = struct.pack("!BBHHH", 8, 0, checksum, ident, seq) + payload
    with socket_in_netns(ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        try:
            sock.sendto(packet, (address, 0))
        except OSError:
            return False
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            try:
                data, peer = sock.recvfrom(2048)
            except TimeoutError:
                return False
            ihl = (data[0] & 0x0F) * 4
            if len(data) < ihl + 8:
                continue
            icmp_type, _, _, r_ident, r_seq = struct.unpack("!BBHHH", data[ihl : ihl + 8])
            if icmp_type == 0 and r_ident == ident and r_seq == seq and peer[0] == address:
                return True
    return False


def measure_throughput(
    src_ns: str,
    dst_ns: str,
    dst_address: str,
    *,
    seconds: float = 1.0,
    timeout: float = 15.0,
) -> float:
    """Send TCP data as fast as possible from ``src_ns`` to a listener on ``dst_address`` in
    ``dst_ns`` for about ``seconds``; return the rate the receiver saw, in Mbit/s.

    Raises LabError if the transfer does not finish within ``timeout``.
    """
    listener = socket_in_netns(dst_ns, socket.AF_INET, socket.SOCK_STREAM)
    received: list[tuple[int, float]] = []
    failures: list[BaseException] = []

    def receive() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(timeout)
                total, first, last = 0, 0.0, 0.0
                while chunk := conn.recv(1 << 20):
                    now = time.monotonic()
                    if total == 0:
                        first = now
                    total += len(chunk)
                    last = now
                received.append((total, last - first))
        except BaseException as exc:  # reported by the sending thread
            failures.append(exc)

    with listener:
        listener.settimeout(timeout)
        listener.bind((dst_address, 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        receiver = threading.Thread(target=receive, name="throughput-receiver", daemon=True)
        receiver.start()
        try:
            sender = socket_in_netns(src_ns, socket.AF_INET, socket.SOCK_STREAM)
            with sender:
                # A small send buffer bounds how long the tail takes to drain on a slow link.
                sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
                sender.settimeout(timeout)
                sender.connect((dst_address, port))
                block = b"\0" * (64 * 1024)
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    sender.sendall(block)
                sender.shutdown(socket.SHUT_WR)
                receiver.join(timeout)
        except OSError as exc:
            raise LabError(f"throughput test {src_ns} -> {dst_address} failed: {exc}") from exc
    if receiver.is_alive():
        raise LabError(f"throughput test {src_ns} -> {dst_address} did not finish in {timeout}s")
    if failures:
        raise LabError(f"throughput receiver in {dst_ns} failed: {failures[0]}") from failures[0]
    total, elapsed = received[0]
    if elapsed <= 0:
        raise LabError(f"throughput test {src_ns} -> {dst_address} moved too little data")
    return total * 8 / elapsed / 1_000_000
