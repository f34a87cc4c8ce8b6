"""The web client end to end: real headless Chromium (Debian's, through its chromedriver) against
the lab's center, doing what the seed does in the vSphere Client.

Sign in, open vm-a, run the Migrate wizard compute-only to 172.16.0.173, watch the task reach
100 %, find vm-a under .173; the wizard shows the precheck's errors for an impossible destination;
the cluster's EVC dialog shows which host supports which mode. Every screen is saved as a
screenshot in artifacts/web/.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from kvmotion.lab import labcenter, topology
from kvmotion.lab.demo import guest_ip, vm_spec, wait_for_guest
from kvmotion.pki import spki_sha256
from tests.lab.conftest import ARTIFACTS, center_http

pytestmark = pytest.mark.lab

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402

SRC, DST = "172.16.0.172", "172.16.0.173"
SHOTS = ARTIFACTS / "web"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
T = TypeVar("T")


@pytest.fixture(scope="module")
def center(mixed_lab: topology.LabState) -> Iterator[httpx.Client]:
    yield from center_http(mixed_lab)


@pytest.fixture(scope="module")
def vms(mixed_lab: topology.LabState, center: httpx.Client) -> Iterator[None]:
    """vm-a on .172's shared datastore (movable), vm-local on .172's local disk (not, compute
    only), both running."""
    for name, index, datastore in (("vm-a", 0, "shared"), ("vm-local", 1, "local-172")):
        spec = vm_spec(name, index, datastore=datastore)
        r = center.post("/v1/vms", json={"host": SRC, "spec": spec})
        assert r.status_code == 201, r.text
        assert center.post(f"/v1/vms/{name}/power-on").status_code == 200
    wait_for_guest(mixed_lab, guest_ip(0)).close()
    yield


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    yield from chromium()


def chromium() -> Iterator[WebDriver]:
    """Headless Chromium through Debian's chromedriver (skips without them), quit after use."""
    if not (Path(CHROMIUM).exists() and shutil.which(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed (./run setup)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000"):
        options.add_argument(arg)
    state = topology.load_state()
    if state is not None and state.ca_file.is_file():
        # The user trusted the lab's CA: its certificates (the center's) pass, no others.
        options.add_argument(f"--ignore-certificate-errors-spki-list={spki_sha256(state.ca_file)}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    driver.implicitly_wait(0)
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def wait(what: str, fn: Callable[[], T | None], timeout: float = 20.0) -> T:
    """Poll ``fn`` until it returns something truthy (bounded)."""
    end = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < end:
        try:
            value = fn()
            if value:
                return value
        except WebDriverException as exc:  # an element replaced while we looked at it
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout:.0f} s (last error: {last})")


def css(driver: WebDriver | WebElement, selector: str) -> WebElement | None:
    found = driver.find_elements(By.CSS_SELECTOR, selector)
    return found[0] if found and found[0].is_displayed() else None


def click(driver: WebDriver, selector: str, timeout: float = 20.0) -> WebElement:
    element = wait(f"{selector} to be clickable", lambda: _enabled(css(driver, selector)), timeout)
    element.click()
    return element


def _enabled(element: WebElement | None) -> WebElement | None:
    return element if element is not None and element.is_enabled() else None


def shot(driver: WebDriver, name: str) -> None:
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def no_js_errors(driver: WebDriver) -> None:
    logs: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[attr-defined]
    severe = [e for e in logs if e.get("level") == "SEVERE"]
    # A 4xx the app asked for on purpose (a refused precheck) is logged by Chromium as a
    # failed resource load; script errors are not allowed.
    scripts = [e for e in severe if "Failed to load resource" not in e.get("message", "")]
    assert scripts == [], scripts


def sign_in(driver: WebDriver, token: str) -> None:
    lc = labcenter.load_center()
    assert lc is not None
    driver.get(lc.url + "/")
    field = wait("the sign-in form", lambda: css(driver, "#token"))
    shot(driver, "01-sign-in")
    field.send_keys("wrong-token")
    click(driver, "#signin")
    error = wait("a refusal of a wrong token", lambda: css(driver, "#signin-error"))
    wait("the refusal's text", lambda: error.text.strip())
    field.clear()
    field.send_keys(token)
    click(driver, "#signin")
    wait("the app after sign-in", lambda: css(driver, "#app"))


def tree_item(driver: WebDriver, kind: str, name: str) -> WebElement | None:
    return css(driver, f'#tree [data-kind="{kind}"][data-name="{name}"]')


def open_item(driver: WebDriver, kind: str, name: str) -> None:
    item = wait(f"{kind} {name} in the tree", lambda: tree_item(driver, kind, name))
    label = item.find_elements(By.CSS_SELECTOR, "*")
    (label[0] if label else item).click()


def field_text(driver: WebDriver, summary: str, field: str) -> str:
    element = css(driver, f'{summary} [data-field="{field}"]')
    return element.text if element is not None else ""


def host_of_vm_in_tree(driver: WebDriver, vm: str) -> str | None:
    for host in driver.find_elements(By.CSS_SELECTOR, '#tree [data-kind="host"]'):
        if host.find_elements(By.CSS_SELECTOR, f'[data-kind="vm"][data-name="{vm}"]'):
            return host.get_attribute("data-name")
    return None


def test_sign_in_and_migrate_vm_a_with_the_wizard(
    mixed_lab: topology.LabState, center: httpx.Client, vms: None, browser: WebDriver
) -> None:
    lc = labcenter.load_center()
    assert lc is not None
    sign_in(browser, lc.token)
    wait("vm-a under .172 in the tree", lambda: host_of_vm_in_tree(browser, "vm-a") == SRC)
    shot(browser, "02-inventory")

    open_item(browser, "host", SRC)
    wait("the host summary", lambda: css(browser, "#host-summary"))
    assert "172.16.1.172" in field_text(browser, "#host-summary", "migration_address")
    # The modes the summary lists are exactly those the host reports supported: Merom, the seed's.
    listed = [li.get_attribute("data-mode") for li in browser.find_elements(
        By.CSS_SELECTOR, '#host-summary [data-field="evc_modes"] li[data-mode]')]  # fmt: skip
    facts = center.get(f"/v1/hosts/{SRC}").json()["facts"]["cpu_model"]
    assert listed == [m["key"] for m in facts["evc_modes"] if m["supported"]], (listed, facts)
    assert "intel-merom" in listed and facts["highest_evc_mode"] == "intel-merom", facts
    shot(browser, "03-host-summary")

    open_item(browser, "vm", "vm-a")
    wait("the VM summary", lambda: css(browser, "#vm-summary"))
    assert SRC in field_text(browser, "#vm-summary", "host")
    power = css(browser, '#vm-summary [data-field="power_state"]')
    assert power is not None and power.get_attribute("data-value") == "poweredOn"
    assert power.text == "Powered on"
    assert "shared" in field_text(browser, "#vm-summary", "datastores")
    shot(browser, "04-vm-summary")

    click(browser, "#migrate-btn")
    wait("the wizard", lambda: css(browser, "#wizard"))
    click(browser, 'input[name="mtype"][value="compute"]')
    shot(browser, "05-wizard-type")
    click(browser, "#wizard-next")
    candidate = wait(
        "the destination's compatibility check",
        lambda: _checked(css(browser, f'[data-candidate-host="{DST}"]')),
        timeout=40,
    )
    assert candidate.find_element(By.CSS_SELECTOR, ".compat").text.startswith("Compatible")
    candidate.find_element(By.CSS_SELECTOR, 'input[name="dest-host"]').click()
    shot(browser, "06-wizard-destination")
    click(browser, "#wizard-next")
    wait("the priority and downtime step", lambda: css(browser, "#downtime"))
    shot(browser, "07-wizard-options")
    click(browser, "#wizard-next")
    review = wait("the review", lambda: css(browser, "#review"))
    assert DST in review.text and "vm-a" in review.text
    wait("the prediction", lambda: (css(browser, "#prediction") or review).text.strip(), 40)
    shot(browser, "08-wizard-review")
    click(browser, "#wizard-finish")
    wait("the wizard to close", lambda: css(browser, "#wizard") is None)

    task_id = _latest_task(center)
    row = f'#tasks [data-task-id="{task_id}"]'
    wait("the task in Recent Tasks", lambda: css(browser, row))
    shot(browser, "09-task-running")
    wait(
        "the task to reach 100 % and succeed",
        lambda: _row_done(browser, row),
        timeout=120,
    )
    shot(browser, "10-task-done")
    wait("vm-a under .173 in the tree", lambda: host_of_vm_in_tree(browser, "vm-a") == DST, 30)
    assert center.get("/v1/vms/vm-a").json()["host"] == DST

    click(browser, row)
    detail = wait("the task's detail", lambda: css(browser, "#task-detail"))
    steps = [
        r.get_attribute("data-step")
        for r in detail.find_elements(By.CSS_SELECTOR, "#task-timeline [data-step]")
    ]
    for step in ("requested", "precopy", "stunned", "resumed", "source_removed"):
        assert step in steps, steps
    chart = wait("the per-pass chart", lambda: css(browser, "svg#task-chart"))
    assert chart.find_elements(By.CSS_SELECTOR, "path, polyline, line, circle, rect")
    shot(browser, "11-task-detail")
    no_js_errors(browser)


def _checked(candidate: WebElement | None) -> WebElement | None:
    """A candidate whose compatibility has been checked (its verdict is shown)."""
    if candidate is None:
        return None
    verdict = candidate.find_elements(By.CSS_SELECTOR, ".compat")
    text = verdict[0].text if verdict else ""
    return candidate if text.startswith(("Compatible", "Warnings", "Errors")) else None


def _latest_task(center: httpx.Client) -> int:
    tasks: list[dict[str, Any]] = center.get("/v1/tasks").json()
    return int(max(t["id"] for t in tasks))


def _row_done(driver: WebDriver, row: str) -> bool:
    element = css(driver, row)
    if element is None:
        return False
    state = element.find_element(By.CSS_SELECTOR, ".state").text.strip()
    if state in ("error", "cancelled"):
        raise AssertionError(f"the task ended {state}: {element.text}")
    progress = element.find_element(By.CSS_SELECTOR, ".progress-text").text
    return state == "success" and progress.startswith("100")


def test_wizard_shows_why_a_destination_is_impossible(
    mixed_lab: topology.LabState, vms: None, browser: WebDriver
) -> None:
    """vm-local's disk is on .172's local datastore: compute only to .173 is refused, and the
    wizard says so with the precheck's reason and the fix."""
    open_item(browser, "vm", "vm-local")
    wait("the VM summary", lambda: css(browser, "#vm-summary"))
    click(browser, "#migrate-btn")
    click(browser, 'input[name="mtype"][value="compute"]')
    click(browser, "#wizard-next")
    candidate = wait(
        "the destination's compatibility check",
        lambda: _checked(css(browser, f'[data-candidate-host="{DST}"]')),
        timeout=40,
    )
    verdict = candidate.find_element(By.CSS_SELECTOR, ".compat").text
    assert verdict.startswith("Errors"), verdict
    reasons = candidate.find_element(By.CSS_SELECTOR, ".compat-reasons").text
    assert "local-172" in reasons and "both" in reasons, reasons
    shot(browser, "12-wizard-precheck-error")
    click(browser, "#wizard-cancel")
    wait("the wizard to close", lambda: css(browser, "#wizard") is None)


def test_evc_dialog_shows_per_host_support(
    mixed_lab: topology.LabState, vms: None, browser: WebDriver
) -> None:
    """The seed's mixed cluster: .172 is a Merom, .173 a Nehalem."""
    open_item(browser, "cluster", "Cluster")
    wait("the cluster summary", lambda: css(browser, "#cluster-summary"))
    click(browser, "#evc-btn")
    dialog = wait("the EVC dialog", lambda: css(browser, "#evc-dialog"))

    def support(mode: str, host: str) -> str:
        cell = dialog.find_element(
            By.CSS_SELECTOR, f'tr[data-mode="{mode}"] td[data-host="{host}"]'
        )
        return cell.text.strip()

    wait("the modes table", lambda: dialog.find_elements(By.CSS_SELECTOR, "tr[data-mode]"))
    assert support("intel-merom", SRC) == "yes" and support("intel-merom", DST) == "yes"
    assert support("intel-nehalem", SRC) == "no" and support("intel-nehalem", DST) == "yes"
    shot(browser, "13-evc-dialog")
    click(browser, "#evc-close")
    click(browser, "#nav-events")
    events = wait("the event log", lambda: css(browser, "#events"))
    wait("vm-a's migration in the event log", lambda: "vm-a" in events.text)
    shot(browser, "14-events")
    no_js_errors(browser)
