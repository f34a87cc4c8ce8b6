"""The Debian 12 server image as built, without booting it: a real build (``./run test`` makes it
before the tests) is found in the cache without building again, and the file is what its
manifest says: a self-contained qcow2 (no backing file) of the recipe's virtual size.

Booting it is tested through the product, as users run it, where each boot serves many checks:
by SeaBIOS in tests/lab/test_real_vm.py, by OVMF in tests/lab/test_uefi_vm.py (GRUB from the
disk, cloud-init from the NoCloud seed, the services, the guest agent; both over SSH from the
lab's client). The bare-QEMU boots this module used to make cost 80-120 s of every CI run each,
for checks those modules now make on guests they boot anyway.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from kvmotion.lab.osimage import DEBIAN_12, build_os_image, find_os_image

pytestmark = pytest.mark.lab


def test_the_built_image_is_cached_and_self_contained() -> None:
    built = build_os_image()
    started = time.monotonic()
    assert find_os_image() == built  # the cache answers without building
    assert time.monotonic() - started < 1.0
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(built.path)],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout
    )  # fmt: skip
    assert info["format"] == "qcow2" and "backing-filename" not in info, info
    assert info["virtual-size"] == built.virtual_size_bytes == DEBIAN_12.disk_bytes
    assert built.path.stat().st_size == built.size_bytes
