"""A VM's NoCloud seed: the small ISO labelled ``cidata`` that cloud-init reads at first boot.

It is derived data, written by the agent from the VM's record (:class:`FirstBoot`) wherever the
record is made (creation, a storage move, the destination of a "change both"), so that the seed
is always beside the record and moves with it. The instance id is the VM's uuid: cloud-init
configures the guest once, and a moved VM, whose uuid stays, is not configured again.

Keys go in the meta-data's ``public-keys`` (cloud-init gives them to the image's default user),
so the user's own user-data is passed through unchanged, never merged.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path

from kvmotion.errors import ExecutionError
from kvmotion.host.vmconfig import FirstBoot

GENISOIMAGE = "genisoimage"
EMPTY_USER_DATA = "#cloud-config\n{}\n"


def meta_data(instance_id: str, first_boot: FirstBoot) -> str:
    """NoCloud meta-data, as JSON (YAML's subset: no quoting rules to get wrong)."""
    body: dict[str, object] = {
        "instance-id": instance_id,
        "local-hostname": first_boot.hostname,
    }
    if first_boot.ssh_keys:
        body["public-keys"] = list(first_boot.ssh_keys)
    return json.dumps(body, indent=2) + "\n"


async def write_seed(path: Path, instance_id: str, first_boot: FirstBoot) -> None:
    """Write the seed ISO at ``path`` (atomically: a crash leaves no half seed). Raises
    ExecutionError if genisoimage fails or is missing."""
    with tempfile.TemporaryDirectory(prefix=".seed-", dir=path.parent) as tmp:
        src = Path(tmp)
        (src / "meta-data").write_text(meta_data(instance_id, first_boot))
        (src / "user-data").write_text(first_boot.user_data or EMPTY_USER_DATA)
        out = src / "seed.iso"
        try:
            proc = await asyncio.create_subprocess_exec(
                GENISOIMAGE, "-quiet", "-output", str(out), "-volid", "cidata",
                "-joliet", "-rock", str(src / "user-data"), str(src / "meta-data"),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        except FileNotFoundError:
            raise ExecutionError(
                f"{GENISOIMAGE} is not installed on this host: install Debian's genisoimage "
                "package (./run setup does) to give VMs a first-boot seed",
                code="seed_failed",
            ) from None
        output, _ = await proc.communicate()
        if proc.returncode != 0:
            raise ExecutionError(
                f"could not write the first-boot seed: {output.decode(errors='replace').strip()}",
                code="seed_failed",
            )
        with open(out, "rb") as f:
            os.fsync(f.fileno())
        out.replace(path)
