"""A development center for the web client: a real :class:`Center` whose hosts are fake agents.

    .venv/bin/python -m tests.web.dev_center            # http://127.0.0.1:8601/, token "dev"

Nothing here touches QEMU, namespaces or the lab: the hosts are the fake agents of
``tests/unit/fake_agent.py`` (one ``httpx`` transport), given a little more so that every screen
has content:

- five hosts in three clusters: ``Cluster`` holds the seed's 172.16.0.172 (Intel "Nehalem") and
  172.16.0.173 (Intel "Westmere"); ``Cluster-B`` holds 172.16.0.174 (Intel "Skylake", little free
  memory) and 172.16.0.175 (Intel "Ice Lake"); ``Cluster-AMD`` holds 172.16.0.176 (AMD "Zen 2");
- each host's ``cpu_model`` facts computed by the real EVC code (``kvmotion.host.cpu.HostCpu``)
  over a synthetic QEMU probe (nested feature sets per generation), so EVC modes, refusals and
  the precheck's CPU findings are the product's own;
- VMs on shared and local datastores, one powered off, one started with a CPU only Westmere has;
- power-on/-off, shutdown, dirty-rate and memory-profile sampling (predictions) and tuning
  routes the unit fake lacks;
- migrations slowed down (``--poll-delay``) so progress can be watched, with varied per-pass
  samples for the chart, and one finished migration in Recent Tasks at start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import httpx

from kvmotion.center import runs
from kvmotion.center.api import create_app
from kvmotion.center.service import Center, CenterConfig
from kvmotion.cpu.catalog import get_mode
from kvmotion.cpu.qemu_cpus import CpuModel, CpuProbe
from kvmotion.errors import KvmotionError
from kvmotion.host.cpu import HostCpu
from kvmotion.migration.request import MigrationRequest
from tests.unit.fake_agent import PORT, TOKEN, AgentError, FakeAgents, FakeHost, FakeVm, GiB

log = logging.getLogger("dev_center")

QEMU_VERSION = "8.2.2"

# -- a synthetic QEMU CPU probe: each generation adds features to the one before ---------------
_BASE = ("fpu", "tsc", "cx8", "cmov", "mmx", "fxsr", "sse", "sse2", "syscall", "nx", "lm", "pni")
_INTEL = {
    "Conroe-v1": ("ssse3", "cx16", "lahf-lm"),
    "Penryn-v1": ("sse4.1",),
    "Nehalem-v1": ("sse4.2", "popcnt"),
    "Westmere-v1": ("aes", "pclmulqdq"),
    "SandyBridge-v1": ("avx", "xsave", "tsc-deadline"),
    "IvyBridge-v1": ("f16c", "rdrand", "fsgsbase", "erms"),
    "Haswell-v2": ("avx2", "bmi1", "bmi2", "fma", "movbe", "invpcid"),
    "Broadwell-v2": ("adx", "rdseed", "smap", "3dnowprefetch"),
    "Skylake-Server-v3": ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "xsavec"),
    "Cascadelake-Server-v3": ("avx512-vnni", "arch-capabilities", "ibrs-all", "mds-no"),
    "Icelake-Server-v3": ("avx512vbmi", "gfni", "vaes", "vpclmulqdq", "sha-ni"),
    "SapphireRapids-v1": ("amx-tile", "amx-int8", "amx-bf16", "avx512-fp16"),
}
_AMD = {
    "Opteron_G1-v1": ("3dnowprefetch",),
    "Opteron_G2-v1": ("cx16",),
    "Opteron_G3-v1": ("abm", "sse4a", "lahf-lm", "popcnt", "monitor"),
    "Opteron_G4-v1": ("ssse3", "sse4.1", "sse4.2", "avx", "xop", "fma4", "aes", "pclmulqdq"),
    "Opteron_G5-v1": ("fma", "f16c", "tbm", "bmi1"),
    "EPYC-v1": ("avx2", "bmi2", "movbe", "rdrand", "rdseed", "adx", "sha-ni", "smap", "xsavec"),
    "EPYC-Rome-v1": ("clwb", "wbnoinvd", "ibpb"),
    "EPYC-Milan-v1": ("pku", "erms", "fsrm", "invpcid", "pcid"),
    "EPYC-Genoa-v1": ("avx512f", "avx512bw", "avx512vl", "avx512-vnni", "gfni", "vaes"),
}
# Models that drop features of the generation before them (QEMU's models do not all nest).
_DROPS = {"EPYC-v1": ("xop", "fma4", "tbm", "monitor")}


def _expansions() -> dict[str, frozenset[str]]:
    out: dict[str, frozenset[str]] = {"qemu64": frozenset(_BASE)}
    for table in (_INTEL, _AMD):
        features: set[str] = set(_BASE)
        for model, added in table.items():
            features = (features - set(_DROPS.get(model, ()))) | set(added)
            out[model] = frozenset(features)
    return out


def synthetic_probe(vendor: str) -> CpuProbe:
    expansions = _expansions()
    models = [m for m in expansions if m != "qemu64"]
    host = frozenset().union(*(expansions[m] for m in models))
    return CpuProbe(
        qemu_version=QEMU_VERSION,
        accel="tcg",
        definitions={m: CpuModel(m, True, ()) for m in expansions},
        expansions=expansions,
        model_vendors={m: ("intel" if m in _INTEL else "amd") for m in models},
        host_features=host,
        host_vendor=vendor,
    )


def host_cpu(generation: str) -> HostCpu:
    mode = get_mode(generation)
    return HostCpu(synthetic_probe(mode.vendor), mode)


# -- the fake agents, with what the web client needs beyond the unit fake ----------------------
_EXTRA = (
    ("power_off", "POST", re.compile(r"^/v1/vms/(?P<vm>[^/]+)/power-off$")),
    ("shutdown", "POST", re.compile(r"^/v1/vms/(?P<vm>[^/]+)/shutdown$")),
    ("dirty_rate", "POST", re.compile(r"^/v1/vms/(?P<vm>[^/]+)/dirty-rate$")),
    ("memory_profile", "POST", re.compile(r"^/v1/vms/(?P<vm>[^/]+)/memory-profile$")),
    ("tune", "POST", re.compile(r"^/v1/vms/(?P<vm>[^/]+)/migration/tune$")),
)


class DevAgents(FakeAgents):
    """Fake agents whose VMs have CPUs (resolved by each host's :class:`HostCpu`), that power
    off, sample a dirty rate, and migrate slowly enough to watch."""

    def __init__(self, poll_delay: float) -> None:
        super().__init__()
        self.poll_delay = poll_delay
        self.cpus: dict[str, HostCpu] = {}  # by host name
        self.vm_cpu: dict[str, dict[str, Any] | None] = {}  # by VM name: the CPU it runs with

    def add_dev_host(self, name: str, generation: str, **facts: Any) -> FakeHost:
        host = self.add_host(name)
        cpu = self.cpus[name] = host_cpu(generation)
        host.facts["cpu_model"] = cpu.facts()
        host.facts["migration_link_bps"] = 125_000_000  # 1 Gbit/s
        host.facts["qemu_version"] = QEMU_VERSION
        for key, value in facts.items():
            if isinstance(value, dict) and isinstance(host.facts.get(key), dict):
                host.facts[key] = host.facts[key] | value
            else:
                host.facts[key] = value
        return host

    def add_dev_vm(
        self, host: str, name: str, *, cpu_model: str = "qemu64", vcpus: int = 1, **kw: Any
    ) -> FakeVm:
        vm = self.add_vm(host, name, cpu_model=cpu_model, **kw)
        vm.config["vcpus"] = vcpus
        self.script(
            name,
            phases=(*("active",) * 10, "device", "completed"),
            disk_phases=(*("copying",) * 8, "ready", "completed"),
            disk_offsets=(*(GiB * i // 8 for i in range(1, 9)), GiB, GiB),
            on_poll=self._slow,
        )
        if vm.power_state == "poweredOn":
            self.vm_cpu[name] = self._resolve(host, cpu_model, None)
        return vm

    def _resolve(self, host: str, cpu_model: str, evc_mode: str | None) -> dict[str, Any]:
        cpu = self.cpus[host].resolve(cpu_model, evc_mode)
        return {"model": cpu.model, "evc_mode": cpu.evc_mode, "features": list(cpu.features)}

    async def _slow(self, poll: int, phase: str) -> None:
        await asyncio.sleep(self.poll_delay)

    def _route(self, request: httpx.Request) -> tuple[str, str | None]:
        for name, method, pattern in _EXTRA:
            match = pattern.match(request.url.path)
            if match and method == request.method:
                return name, match.group("vm")
        return super()._route(request)

    async def _serve(
        self, host: FakeHost, route: str, ref: str | None, body: Any, query: dict[str, str]
    ) -> tuple[int, Any]:
        if route in ("power_off", "shutdown", "dirty_rate", "memory_profile", "tune"):
            assert ref is not None
            vm = host.find(ref)
            if route == "dirty_rate":
                await asyncio.sleep(min(float((body or {}).get("seconds", 1)), 1.0))
                return 200, {"dirty_rate_bps": 3.5 * 2**20}
            if route == "memory_profile":
                await asyncio.sleep(1.0)
                ram = int(vm.config.get("memory_mib", 256)) * 2**20
                return 200, {
                    "ram_bytes": ram,
                    "nonzero_bytes": ram // 4,
                    "dirty_rate_bps": 3.5 * 2**20,
                    "working_set_bytes": 16 * 2**20,
                }
            if route == "tune":
                return 200, self._with_cpu(vm.info())
            if vm.power_state != "poweredOn":
                raise AgentError(409, "wrong_state", f"VM {vm.name} is {vm.power_state}")
            vm.power_state, vm.qemu_status = "poweredOff", None
            self.vm_cpu[vm.name] = None
            return 200, self._with_cpu(vm.info())
        if route == "power_on" and ref is not None:
            vm = host.find(ref)
            try:
                self.vm_cpu[vm.name] = self._resolve(
                    host.name,
                    str(vm.config.get("cpu_model", "qemu64")),
                    (body or {}).get("evc_mode"),
                )
            except KvmotionError as exc:
                raise AgentError(exc.http_status, exc.code, exc.message) from None
        if route == "get" and ref is not None:
            await self._storage_delay(host, ref)
        status, content = await super()._serve(host, route, ref, body, query)
        if route == "get" and ref is not None:
            self._vary_samples(host, ref)
        return status, self._with_cpu(content)

    async def _storage_delay(self, host: FakeHost, ref: str) -> None:
        with contextlib.suppress(AgentError):
            vm = host.find(ref)
            if vm.storage is not None and vm.storage["phase"] in ("copying", "ready"):
                await asyncio.sleep(self.poll_delay)

    def _vary_samples(self, host: FakeHost, ref: str) -> None:
        """The unit fake's samples are flat; give the chart something to draw."""
        with contextlib.suppress(AgentError):
            view = host.find(ref).migration
            if not view or view.get("side") != "source":
                return
            for sample in view["samples"]:
                n = int(sample["pass_no"])
                sample["dirty_rate_bps"] = round(4e6 * math.exp(-0.25 * n) + 6e5)
                sample["throughput_bps"] = round(1.1e7 + 1.5e6 * math.sin(n))
                sample["throttle_pct"] = min(40, max(0, (n - 4) * 10))

    def _with_cpu(self, content: Any) -> Any:
        if isinstance(content, list):
            return [self._with_cpu(c) for c in content]
        if isinstance(content, dict) and "uuid" in content and "power_state" in content:
            if content["power_state"] in ("poweredOn", "incoming"):
                return content | {"cpu": self.vm_cpu.get(content["name"])}
            return content | {"cpu": None}
        if isinstance(content, dict) and isinstance(content.get("vm"), dict):
            return content | {"vm": self._with_cpu(content["vm"])}
        return content


# -- the world -----------------------------------------------------------------------------------
H172, H173, H174, H175, H176 = (f"172.16.0.{n}" for n in range(172, 177))
CLUSTERS = {"Cluster-B": (H174, H175), "Cluster-AMD": (H176,)}  # the rest stay in "Cluster"
XEON = "Intel(R) Xeon(R)"


def build_agents(poll_delay: float) -> DevAgents:
    """The seed's two hosts (Nehalem and Westmere: a mixed cluster whose EVC mode is refused
    until vm-w, started with Westmere features, is power-cycled), two more Intel hosts (one
    short of memory), and an AMD host (Intel and AMD never mix)."""
    agents = DevAgents(poll_delay)
    agents.add_dev_host(H172, "intel-nehalem", cpu={"model_name": f"{XEON} X5570", "count": 16})
    agents.add_dev_host(H173, "intel-westmere", cpu={"model_name": f"{XEON} X5670", "count": 24})
    agents.add_dev_host(
        H174,
        "intel-skylake",
        cpu={"model_name": f"{XEON} Gold 6130", "count": 32},
        memory={"total_bytes": 8 * GiB, "available_bytes": int(1.1 * GiB)},
    )
    h175 = agents.add_dev_host(
        H175, "intel-icelake", cpu={"model_name": f"{XEON} Gold 6338", "count": 64}
    )
    h175.facts["networks"].append({"name": "backup-net", "bridge": "kvbr-backup", "present": True})
    agents.add_dev_host(
        H176,
        "amd-zen2",
        cpu={"vendor": "AuthenticAMD", "model_name": "AMD EPYC 7402P 24-Core", "count": 48},
    )
    agents.add_dev_vm(H172, "vm-a", memory_mib=1024, vcpus=2)
    agents.add_dev_vm(H172, "vm-b", memory_mib=512)
    agents.add_dev_vm(H172, "vm-l", datastore="local-172", memory_mib=512)
    agents.add_dev_vm(H172, "vm-off", power_state="poweredOff")
    agents.add_dev_vm(H173, "vm-w", cpu_model="Westmere-v1", memory_mib=2048, vcpus=4)
    agents.add_dev_vm(H174, "vm-sky", memory_mib=512, datastore="local-174")
    agents.add_dev_vm(
        H175, "vm-db", memory_mib=4096, vcpus=8, networks=("vm-network", "backup-net")
    )
    agents.add_dev_vm(H176, "vm-amd", cpu_model="EPYC-Rome-v1", memory_mib=1024, vcpus=2)
    return agents


async def build_center(db_dir: Path, agents: DevAgents, token: str, poll_delay: float) -> Center:
    """A center database with the hosts added, the second cluster made, and one finished
    migration (so Recent Tasks has a timeline and a chart to show); returns the serving center
    (not started: uvicorn's lifespan starts it)."""

    def config() -> CenterConfig:
        return CenterConfig(
            db_url=f"sqlite+aiosqlite:///{db_dir}/center.db",
            token=token,
            refresh_interval_s=3.0,
            listen="127.0.0.1",
        )

    setup = Center(config(), transport=agents)
    await setup.start()
    try:
        for address in (H172, H173, H174, H175, H176):
            await setup.inventory.add_host(address, TOKEN, PORT)
        for cluster, members in CLUSTERS.items():
            await setup.clusters.create(cluster)
            for address in members:
                await setup.clusters.add_host(cluster, address)
        agents.poll_delay = 0.0
        task_id = await setup.executor.submit(MigrationRequest("vm-b", H173, "compute"))
        await setup.executor.wait(task_id)
        task_id = await setup.executor.submit(MigrationRequest("vm-b", H172, "compute"))
        await setup.executor.wait(task_id)
    finally:
        agents.poll_delay = poll_delay
        await setup.close()
    return Center(config(), transport=agents)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8601)
    parser.add_argument("--token", default="dev")
    parser.add_argument(
        "--poll-delay", type=float, default=0.35, help="seconds each migration poll takes"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    runs.POLL_INTERVAL = 0.1  # the center's polls of the (slowed) fake agents

    import uvicorn

    db_dir = Path(tempfile.mkdtemp(prefix="kvmotion-dev-center-"))
    try:
        agents = build_agents(args.poll_delay)
        center = asyncio.run(build_center(db_dir, agents, args.token, args.poll_delay))
        log.info("dev center at http://%s:%d/ (token %r)", args.host, args.port, args.token)
        uvicorn.run(create_app(center), host=args.host, port=args.port, log_level="warning")
    finally:
        shutil.rmtree(db_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
