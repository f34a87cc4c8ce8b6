"""Ask a QEMU what CPUs it can run here: model definitions, model feature sets, the host's features.

One short-lived QEMU (``-machine none``, the real accelerator, QMP on a unix socket in a temporary
directory) answers everything in one run; it is always stopped (QMP ``quit``, a bounded wait, then
SIGKILL) and its directory removed. Results are cached on disk, keyed by everything that could
change them, so an agent pays for the probe once per machine.

Feature sets come from ``query-cpu-model-expansion`` type **static**: it answers with a static base
model plus every CPUID feature as a boolean under QEMU's canonical name (``sse4.1``, ``lahf-lm``).
Type "full" also lists aliases (``sse4_1``, ``sse4-1``, ``sse3`` for ``pni``) and non-CPUID options
(``check``, ``l3-cache``, ``migratable``), which would make sets from different sources disagree.
The host's features are the static expansion of ``host`` under KVM and of ``max`` under TCG (TCG
has no ``host``; ``max`` is everything TCG can emulate). Under TCG the host has no vendor: TCG
emulates Intel and AMD models alike.

QMP errors and QEMU failing to start become :class:`~kvmotion.errors.QemuError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmotion.errors import QemuError
from kvmotion.qemu.cmdline import QEMU_BINARY
from kvmotion.qemu.qmp import QmpSession

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("/var/cache/kvmotion/cpu")
CACHE_ENV = "KVMOTION_CPU_CACHE"
_CACHE_SCHEMA = 1
_VENDORS = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}


@dataclass(frozen=True)
class CpuModel:
    """One entry of ``query-cpu-definitions``, for the accelerator QEMU ran with."""

    name: str
    runnable: bool  # no unavailable features
    unavailable: tuple[str, ...]  # features this host + accelerator cannot provide
    alias_of: str | None = None  # e.g. "Conroe" -> "Conroe-v1"

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> CpuModel:
        unavailable = tuple(str(f) for f in raw.get("unavailable-features", []))
        alias = raw.get("alias-of")
        return cls(
            str(raw["name"]), not unavailable, unavailable, None if alias is None else str(alias)
        )


@dataclass(frozen=True)
class CpuProbe:
    """What one QEMU said about CPUs on this machine under one accelerator."""

    qemu_version: str  # "7.2.22"
    accel: str
    definitions: Mapping[str, CpuModel]
    expansions: Mapping[str, frozenset[str]]  # model -> enabled features (static expansion)
    # model -> "intel" | "amd" | raw CPUID vendor. Under KVM QEMU gives every model the host's
    # vendor, so only under TCG does this say whose model it is.
    model_vendors: Mapping[str, str]
    host_features: frozenset[str]
    host_vendor: str | None  # None under TCG (it emulates both vendors)
    from_cache: bool = field(default=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "qemu_version": self.qemu_version,
            "accel": self.accel,
            "definitions": [
                {"name": m.name, "unavailable": list(m.unavailable), "alias_of": m.alias_of}
                for m in self.definitions.values()
            ],
            "expansions": {name: sorted(fs) for name, fs in self.expansions.items()},
            "model_vendors": dict(self.model_vendors),
            "host_features": sorted(self.host_features),
            "host_vendor": self.host_vendor,
        }

    @classmethod
    def from_json(cls, body: Mapping[str, Any], *, from_cache: bool = False) -> CpuProbe:
        definitions = {}
        for raw in body["definitions"]:
            unavailable = tuple(raw["unavailable"])
            definitions[raw["name"]] = CpuModel(
                raw["name"], not unavailable, unavailable, raw["alias_of"]
            )
        return cls(
            qemu_version=str(body["qemu_version"]),
            accel=str(body["accel"]),
            definitions=definitions,
            expansions={k: frozenset(v) for k, v in body["expansions"].items()},
            model_vendors={str(k): str(v) for k, v in body["model_vendors"].items()},
            host_features=frozenset(body["host_features"]),
            host_vendor=body["host_vendor"],
            from_cache=from_cache,
        )


def host_model(accel: str) -> str:
    """The model whose expansion is the host's feature set: ``host`` under KVM, else ``max``."""
    return "host" if accel == "kvm" else "max"


def _vendor(cpuid_vendor: str) -> str:
    return _VENDORS.get(cpuid_vendor, cpuid_vendor.lower())


def _parse_expansion(reply: Mapping[str, Any]) -> tuple[frozenset[str], str]:
    props = reply["model"]["props"]
    features = frozenset(name for name, value in props.items() if value is True)
    return features, _vendor(str(props.get("vendor", "")))


# --- cache -------------------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)


def _cache_key(binary: Path, accel: str, models: tuple[str, ...]) -> str:
    try:
        st = binary.stat()
        ident = f"{binary}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        ident = f"{binary}:missing"
    # Under KVM the host's features also depend on the kernel and the physical CPU.
    flags = ""
    with contextlib.suppress(OSError):
        flags = next(
            (
                line
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("flags")
            ),
            "",
        )
    parts = [str(_CACHE_SCHEMA), ident, accel, ",".join(models), platform.release(), flags]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _cache_read(path: Path) -> CpuProbe | None:
    try:
        return CpuProbe.from_json(json.loads(path.read_text()), from_cache=True)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable CPU probe cache %s: %s", path, exc)
        return None


def _cache_write(path: Path, probe: CpuProbe) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(probe.to_json(), indent=1, sort_keys=True))
        os.replace(tmp, path)  # atomic: concurrent agents never read half a file
    except OSError as exc:
        log.warning("cannot write CPU probe cache %s: %s", path, exc)


# --- the QEMU run ------------------------------------------------------------------------------


async def _stop(proc: asyncio.subprocess.Process, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), timeout)
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def _exited(proc: asyncio.subprocess.Process, output: Path) -> QemuError:
    text = output.read_text(errors="replace").strip()
    return QemuError(
        f"QEMU exited (code {proc.returncode}) before answering QMP: {text or 'no output'}",
        exit_code=proc.returncode,
        output=text,
    )


async def _accepting(path: Path) -> bool:
    """True if something accepts connections on the unix socket ``path``."""
    try:
        _, writer = await asyncio.open_unix_connection(str(path))
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def _connect(
    proc: asyncio.subprocess.Process, session: QmpSession, output: Path, timeout: float
) -> None:
    """Connect to QMP, or fail fast with QEMU's output if it exits first (e.g. no KVM).

    QEMU creates its QMP socket before it initializes the accelerator, which may then fail and
    leave a dead socket behind; so wait until the socket accepts (plain connect, no QMP) while
    watching the process, and only then open the QMP session (whose retries would log each
    refused attempt and cannot be cancelled cleanly).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await _accepting(session.socket_path):
        if proc.returncode is not None:
            raise _exited(proc, output)
        if loop.time() > deadline:
            raise QemuError(f"QEMU's QMP socket did not accept connections in {timeout:.0f} s")
        await asyncio.sleep(0.02)
    # QEMU may still die right after its socket accepted (the accelerator failed): race the
    # QMP handshake against its exit rather than retrying a dead socket until the deadline.
    connecting = asyncio.create_task(session.connect(max(1.0, deadline - loop.time())))
    exiting = asyncio.create_task(proc.wait())
    done, _ = await asyncio.wait({connecting, exiting}, return_when=asyncio.FIRST_COMPLETED)
    if connecting in done:
        exiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await exiting
        connecting.result()
        return
    connecting.cancel()
    with contextlib.suppress(asyncio.CancelledError, QemuError):
        await connecting
    raise _exited(proc, output)


@contextlib.asynccontextmanager
async def _probe_qemu(binary: str, accel: str, timeout: float) -> AsyncIterator[QmpSession]:
    """A QEMU with no machine under ``accel``, QMP connected; always stopped and cleaned up."""
    with tempfile.TemporaryDirectory(prefix="kvmotion-cpu-") as tmp:
        sock, output = Path(tmp) / "qmp.sock", Path(tmp) / "qemu.log"
        argv = [
            binary, "-machine", "none", "-accel", accel,
            "-nodefaults", "-no-user-config", "-display", "none",
            "-chardev", f"socket,id=qmp0,path={sock},server=on,wait=off",
            "-mon", "chardev=qmp0,mode=control",
        ]  # fmt: skip
        with output.open("wb") as out:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out
                )
            except OSError as exc:
                raise QemuError(f"cannot run {binary}: {exc}", argv=argv) from exc
        session = QmpSession(sock, f"cpu-probe-{accel}")
        quit_sent = False
        try:
            await _connect(proc, session, output, timeout)
            yield session
            with contextlib.suppress(QemuError):
                await session.execute("quit", timeout=2)
                quit_sent = True
        finally:
            await session.close()
            # After `quit`, give QEMU a moment to exit by itself; on any failure, kill at once.
            await _stop(proc, timeout=5 if quit_sent else 0)


async def _run_probe(binary: str, accel: str, models: tuple[str, ...], timeout: float) -> CpuProbe:
    async with _probe_qemu(binary, accel, timeout) as qmp:
        version = (await qmp.execute("query-version"))["qemu"]
        qemu_version = f"{version['major']}.{version['minor']}.{version['micro']}"
        definitions = {
            model.name: model
            for model in map(CpuModel.parse, await qmp.execute("query-cpu-definitions"))
        }
        expansions: dict[str, frozenset[str]] = {}
        vendors: dict[str, str] = {}
        # Models this QEMU does not have (e.g. SapphireRapids-v1 before 8.0) are left out.
        for name in (m for m in models if m in definitions):
            reply = await qmp.execute(
                "query-cpu-model-expansion", {"type": "static", "model": {"name": name}}
            )
            expansions[name], vendors[name] = _parse_expansion(reply)
        reply = await qmp.execute(
            "query-cpu-model-expansion", {"type": "static", "model": {"name": host_model(accel)}}
        )
        host_features, host_vendor = _parse_expansion(reply)
    return CpuProbe(
        qemu_version=qemu_version,
        accel=accel,
        definitions=definitions,
        expansions=expansions,
        model_vendors=vendors,
        host_features=host_features,
        host_vendor=None if accel == "tcg" else host_vendor,
    )


async def probe_cpus(
    accel: str,
    models: Iterable[str],
    *,
    binary: str = QEMU_BINARY,
    cache: Path | None = None,
    use_cache: bool = True,
    timeout: float = 60.0,
) -> CpuProbe:
    """Definitions, the static expansion of each of ``models``, and the host's features.

    ``cache`` is the cache directory (default: $KVMOTION_CPU_CACHE or /var/cache/kvmotion/cpu).
    Raises QemuError when QEMU cannot be found or started, a QMP command fails, or the whole probe
    takes longer than ``timeout`` seconds.
    """
    wanted = tuple(sorted(set(models)))
    resolved = shutil.which(binary)
    if resolved is None:
        raise QemuError(f"QEMU binary {binary!r} not found", binary=binary)
    path = (cache or cache_dir()) / f"{_cache_key(Path(resolved), accel, wanted)}.json"
    if use_cache and (hit := _cache_read(path)) is not None:
        return hit
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            probe = await _run_probe(resolved, accel, wanted, timeout)
    except TimeoutError as exc:
        raise QemuError(f"probing CPU models under {accel} took over {timeout:.0f} s") from exc
    log.info(
        "probed %d CPU models under %s in %.1f s", len(wanted), accel, time.monotonic() - started
    )
    if use_cache:
        _cache_write(path, probe)
    return probe
