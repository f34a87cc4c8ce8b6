"""The OS image builder's pure parts: the cache key, the manifest, the cache lookup, and what the
Debian recipe promises (no network metadata service, the serial console primary)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvmotion.errors import LabError
from kvmotion.lab.osimage import (
    DEBIAN_12,
    MANIFEST,
    OsImage,
    Recipe,
    find_os_image,
    recipe_digest,
    recipe_for,
)


def changed(value: Any) -> Any:
    """A different value of the same type."""
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, int):
        return value + 1
    assert isinstance(value, tuple)
    return (*value[:-1],) if value else ("x",)


def test_digest_is_a_function_of_the_recipe_alone() -> None:
    code = (
        "from kvmotion.lab.osimage import DEBIAN_12, recipe_digest; print(recipe_digest(DEBIAN_12))"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": seed}, cwd="/",
        ).stdout.strip()
        for seed in ("1", "2")
    }  # fmt: skip
    assert digests == {recipe_digest(DEBIAN_12)}


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Recipe)])
def test_digest_covers_every_field(field: str) -> None:
    other = dataclasses.replace(DEBIAN_12, **{field: changed(getattr(DEBIAN_12, field))})
    assert recipe_digest(other) != recipe_digest(DEBIAN_12)


def image_in(directory: Path) -> OsImage:
    return OsImage("debian-12", directory / "debian-12.qcow2", "d" * 64, 5, 4 << 30, 81.5)


def test_manifest_round_trip(tmp_path: Path) -> None:
    image = image_in(tmp_path)
    text = image.manifest(DEBIAN_12, ["nginx 1.22.1-9"], "Sat, 11 Jul 2026 10:16:37 UTC")
    data = json.loads(text)
    assert data["path"] == "debian-12.qcow2"  # relative: the cache directory may move
    assert data["packages"] == list(DEBIAN_12.packages)
    assert data["installed"] == ["nginx 1.22.1-9"]
    assert OsImage.from_manifest(tmp_path, text) == image


@pytest.mark.parametrize(
    "edit",
    [
        {"path": "../../etc/shadow"},
        {"path": "other.qcow2"},
        {"size_bytes": None},
        {"digest": None, "name": None},
    ],
)
def test_malformed_manifests_are_refused(tmp_path: Path, edit: dict[str, object]) -> None:
    data = json.loads(image_in(tmp_path).manifest(DEBIAN_12, [], None))
    for key, value in edit.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    with pytest.raises(ValueError):
        OsImage.from_manifest(tmp_path, json.dumps(data))


def test_a_manifest_that_is_not_json_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        OsImage.from_manifest(tmp_path, '{"name": "debian-12", ')


def test_find_returns_only_a_complete_image_of_the_current_recipe(tmp_path: Path) -> None:
    assert find_os_image(tmp_path) is None
    directory = tmp_path / "os" / recipe_digest(DEBIAN_12)
    directory.mkdir(parents=True)
    image = dataclasses.replace(image_in(directory), digest=recipe_digest(DEBIAN_12))
    (directory / MANIFEST).write_text(image.manifest(DEBIAN_12, [], None))
    assert find_os_image(tmp_path) is None  # no qcow2 yet
    image.path.write_bytes(b"q" * (image.size_bytes - 1))
    assert find_os_image(tmp_path) is None  # cut short
    image.path.write_bytes(b"q" * image.size_bytes)
    assert find_os_image(tmp_path) == image


def test_unknown_os_is_refused_with_the_known_ones() -> None:
    with pytest.raises(LabError, match=r"'windows'.*known: debian"):
        recipe_for("windows")


def test_debian_recipe_probes_no_network_metadata_service() -> None:
    cloud_cfg = dict(DEBIAN_12.files)["/etc/cloud/cloud.cfg.d/90_kvmotion.cfg"]
    assert "datasource_list: [ NoCloud, None ]" in cloud_cfg.splitlines()


def test_debian_recipe_makes_the_serial_console_primary() -> None:
    consoles = [w for w in DEBIAN_12.cmdline.split() if w.startswith("console=")]
    assert consoles[-1].startswith("console=ttyS0,")
    assert f'GRUB_CMDLINE_LINUX="{DEBIAN_12.cmdline}"' in dict(DEBIAN_12.files)["/etc/default/grub"]
