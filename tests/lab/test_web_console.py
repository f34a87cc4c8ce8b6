"""The web client's VM console end to end: real headless Chromium against the lab's center.

A user opens a running VM's console from its page: the Serial tab's terminal (xterm.js) shows what
the guest printed on its serial port (the kernel's boot log and the lab guest's readiness line);
the VM moves to the other host with the console open and the terminal says so in a line and
stays connected; the VM is powered off and the terminal says why it ended. A VM created with a
screen (``"graphics": true``) has a Screen tab whose canvas (noVNC) shows its display, which comes
back by itself after the VM moves. Every screen is saved in artifacts/web/.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from kvmotion.lab import labcenter, topology
from kvmotion.lab.demo import guest_ip, vm_spec, wait_for_guest
from tests.lab.conftest import center_http, wait_task

pytestmark = pytest.mark.lab

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402

from tests.lab.test_web import (  # noqa: E402
    chromium,
    click,
    css,
    no_js_errors,
    open_item,
    shot,
    wait,
)

SRC, DST = "172.16.0.172", "172.16.0.173"
SERIAL_VM, SCREEN_VM = "vm-con", "vm-screen"
MOVE_S = 300.0  # a compute move of a 256 MiB TCG guest in the lab, with room to spare
# The pixels of the screen's canvas brighter than near-black, and its size (noVNC draws the
# VM's framebuffer into it at its own size and scales the element to fit).
CANVAS_LIT_JS = """
const c = document.querySelector('#console-screen canvas');
if (!c || !c.width || !c.height) return null;
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let lit = 0;
for (let i = 0; i < d.length; i += 4) if (d[i] > 48 || d[i + 1] > 48 || d[i + 2] > 48) lit++;
return [c.width, c.height, lit];
"""


@pytest.fixture(scope="module")
def center(mixed_lab: topology.LabState) -> Iterator[httpx.Client]:
    yield from center_http(mixed_lab)


@pytest.fixture(scope="module")
def vms(mixed_lab: topology.LabState, center: httpx.Client) -> Iterator[None]:
    """vm-con (serial port only) and vm-screen (a screen too) on .172's shared datastore, both
    running and answering."""
    for name, index, graphics in ((SERIAL_VM, 0, False), (SCREEN_VM, 1, True)):
        spec = {**vm_spec(name, index), "graphics": graphics}
        r = center.post("/v1/vms", json={"host": SRC, "spec": spec})
        assert r.status_code == 201, r.text
        r = center.post(f"/v1/vms/{name}/power-on")
        assert r.status_code == 200, r.text
    for index in (0, 1):
        wait_for_guest(mixed_lab, guest_ip(index)).close()
    yield


@pytest.fixture(scope="module")
def browser(center: httpx.Client) -> Iterator[WebDriver]:
    """Chromium, signed in to the lab's center."""
    for driver in chromium():
        signed_in(driver)
        yield driver


def signed_in(driver: WebDriver) -> None:
    lc = labcenter.load_center()
    assert lc is not None
    driver.get(lc.url + "/")
    wait("the sign-in form", lambda: css(driver, "#token")).send_keys(lc.token)
    click(driver, "#signin")
    wait("the app after sign-in", lambda: css(driver, "#app"))


def terminal_text(driver: WebDriver) -> str:
    """The rows the terminal shows now, as the user reads them."""
    rows = css(driver, "#console-terminal .xterm-rows")
    return rows.text if rows is not None else ""


def link_state(driver: WebDriver, kind: str) -> tuple[str, str]:
    """The console's state on a tab (idle, connecting, open, waiting, closed) and its text."""
    status = css(driver, f"#console-state-{kind}")
    if status is None:
        return "", ""
    return status.get_attribute("data-state") or "", status.text


def link_opens(driver: WebDriver, kind: str) -> int:
    """How many times the console on a tab connected (the first time and every reconnect)."""
    status = css(driver, f"#console-state-{kind}")
    return int((status.get_attribute("data-opens") if status is not None else None) or 0)


def open_console(driver: WebDriver, vm: str) -> None:
    open_item(driver, "vm", vm)
    wait(f"{vm}'s summary", lambda: _text(css(driver, "#vm-summary h1")) == vm)
    click(driver, "#console-btn")
    wait("the console dialog", lambda: css(driver, "#console-dialog"))


def move(center: httpx.Client, vm: str, host: str) -> None:
    r = center.post(f"/v1/vms/{vm}/migrate", json={"type": "compute", "host": host})
    assert r.status_code == 202, r.text
    task = wait_task(center, r.json()["id"], deadline=MOVE_S)
    assert task["state"] == "success", task.get("error")


def test_serial_console_shows_the_guest_and_follows_it_to_another_host(
    center: httpx.Client, vms: None, browser: WebDriver
) -> None:
    open_console(browser, SERIAL_VM)
    assert css(browser, "#console-tab-vnc") is None, "a VM without a screen has no Screen tab"
    wait("the serial console to connect", lambda: link_state(browser, "serial")[0] == "open")
    # The center replays the end of the console's log: the guest's boot log (kernel lines with
    # their timestamps) and the lab guest's readiness line, printed once it listens.
    ready = f"KVMOTION-GUEST-READY ip={guest_ip(0)}/24"
    wait("the readiness line in the terminal", lambda: ready in terminal_text(browser))
    assert re.search(r"\[\s*\d+\.\d+\]", terminal_text(browser)), terminal_text(browser)
    focused = browser.execute_script("return document.activeElement.closest('#console-terminal')")
    assert focused is not None, "the terminal has the keyboard once the console opens"
    browser.switch_to.active_element.send_keys(Keys.ESCAPE)  # the VM's key, not the dialog's
    assert css(browser, "#console-dialog") is not None, "Esc in the terminal closed the console"
    shot(browser, "20-console-serial")

    move(center, SERIAL_VM, DST)
    moved = f"[kvmotion: console moved to host {DST}]"
    wait("the terminal to say the console moved", lambda: moved in terminal_text(browser), 60)
    assert link_state(browser, "serial")[0] == "open", link_state(browser, "serial")
    assert link_opens(browser, "serial") == 1, "the serial console followed without a reconnect"
    shot(browser, "21-console-serial-moved")

    r = center.post(f"/v1/vms/{SERIAL_VM}/power-off")
    assert r.status_code == 200, r.text
    wait("the console to end", lambda: link_state(browser, "serial")[0] == "closed", 120)
    why = link_state(browser, "serial")[1]
    assert "no longer running" in why, why  # the center's reason, shown as it said it
    assert "[console closed: the VM is no longer running]" in terminal_text(browser)
    assert css(browser, "#console-reconnect-serial") is not None, "Reconnect is offered"
    shot(browser, "22-console-serial-closed")
    click(browser, "#console-close")
    wait("the dialog to close", lambda: css(browser, "#console-dialog") is None)
    button = wait(
        "the Console button disabled for a VM that is off",
        lambda: _disabled(css(browser, "#console-btn")),
    )
    assert "not running" in (button.get_attribute("title") or "")
    no_js_errors(browser)


def test_screen_tab_shows_the_display_and_comes_back_after_a_move(
    center: httpx.Client, vms: None, browser: WebDriver
) -> None:
    open_console(browser, SCREEN_VM)
    field = css(browser, '#vm-summary [data-field="graphics"]')
    assert field is not None and field.get_attribute("data-value") == "true"
    click(browser, "#console-tab-vnc")
    wait("the screen to connect", lambda: link_state(browser, "vnc")[0] == "open", 30)
    assert link_opens(browser, "vnc") == 1
    width, height, _ = wait("a non-blank screen", lambda: _lit(browser), 60)
    assert width >= 320 and height >= 200, (width, height)
    assert _enabled(css(browser, "#console-cad")), "Ctrl-Alt-Del is offered while connected"
    shot(browser, "23-console-screen")

    move(center, SCREEN_VM, DST)
    # The screen's socket ends with the move; the tab reconnects by itself with a new ticket.
    wait(
        "the screen to reconnect",
        lambda: link_opens(browser, "vnc") == 2 and link_state(browser, "vnc")[0] == "open",
        60,
    )
    wait("the screen after the move", lambda: _lit(browser), 60)
    shot(browser, "24-console-screen-moved")
    click(browser, "#console-tab-serial")
    wait("the serial console to connect", lambda: link_state(browser, "serial")[0] == "open")
    wait("the guest's output", lambda: f"ip={guest_ip(1)}/24" in terminal_text(browser))
    click(browser, "#console-close")
    wait("the dialog to close", lambda: css(browser, "#console-dialog") is None)
    no_js_errors(browser)


def _lit(driver: WebDriver) -> tuple[int, int, int] | None:
    found = driver.execute_script(CANVAS_LIT_JS)
    if not found or found[2] < 100:  # a few lines of text light thousands of pixels
        return None
    return int(found[0]), int(found[1]), int(found[2])


def _text(element: WebElement | None) -> str:
    return element.text if element is not None else ""


def _enabled(element: WebElement | None) -> bool:
    return element is not None and element.is_enabled()


def _disabled(element: WebElement | None) -> WebElement | None:
    return element if element is not None and not element.is_enabled() else None
