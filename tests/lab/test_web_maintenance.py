"""The web client's maintenance mode end to end: real headless Chromium against the lab's center.

On the two-host lab, 172.16.0.172 runs two VMs on the shared datastore and one on its local
datastore ``local-172`` (which no other host sees, so it cannot move). From the host's page the
user enters maintenance mode (the dialog says what will happen); the two shared VMs move to .173
(the tree shows them there) while the page's panel shows the local one blocking the host, with
the reason naming local-172, and the task's page shows the same. The user powers the blocker off
from its page (whose Power on is then refused: no other host sees its disk); the host becomes "In
maintenance" (its badge, the panel, the tree), the Migrate wizard says why it takes no VM, and
the user exits maintenance mode from the host's page. Last, balancing on a cluster of both hosts:
from its page the user saves manual mode at threshold 5 and gets recommendations (each host's
load, the moves with their reasons or why none; none applied); then both movable guests burn
CPU on one host and the user applies the recommendation from the page (its task linked, the VM
moved). Then HA on the same cluster: a host's page shows its HA state (connected; isolated, with
the reason, while its management link is cut; connected again), and the cluster's page each
member's state and admission control's reserve. Screenshots in
artifacts/web/3*.png, 40-*.png and 41-*.png.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from kvmotion.lab import labcenter, topology
from kvmotion.lab.demo import guest_ip, vm_spec, wait_for_guest
from tests.lab.conftest import center_http

pytestmark = pytest.mark.lab

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

from tests.lab.test_web import (  # noqa: E402
    chromium,
    click,
    css,
    host_of_vm_in_tree,
    no_js_errors,
    open_item,
    shot,
    sign_in,
    tree_item,
    wait,
)

SRC, DST = "172.16.0.172", "172.16.0.173"
MOVABLE = ["vm-m0", "vm-m1"]  # on the shared datastore
BLOCKER = "vm-mlocal"  # on local-172: no other host sees its disk
MOVES_S = 600.0  # two compute moves of 256 MiB TCG guests in the lab, with room to spare
ROUND_S = 30.0  # the evacuation looks again every 3 s; the page hears of it over the stream
DRS_CLUSTER = "web-drs"  # made of the lab's hosts for the balancing test


@pytest.fixture(scope="module")
def center(lab: topology.LabState) -> Iterator[httpx.Client]:
    yield from center_http(lab)


@pytest.fixture(scope="module")
def vms(lab: topology.LabState, center: httpx.Client) -> Iterator[None]:
    """Two movable VMs and one blocker on .172, all running and answering."""
    specs = [vm_spec(name, i) for i, name in enumerate(MOVABLE)]
    specs.append(vm_spec(BLOCKER, len(MOVABLE), datastore="local-172"))
    for spec in specs:
        r = center.post("/v1/vms", json={"host": SRC, "spec": spec})
        assert r.status_code == 201, r.text
        r = center.post(f"/v1/vms/{spec['name']}/power-on")
        assert r.status_code == 200, r.text
    for index in range(len(specs)):
        wait_for_guest(lab, guest_ip(index)).close()
    yield


@pytest.fixture(scope="module")
def browser(center: httpx.Client) -> Iterator[WebDriver]:
    """Chromium, signed in to the lab's center."""
    for driver in chromium():
        lc = labcenter.load_center()
        assert lc is not None
        sign_in(driver, lc.token)
        yield driver


def host_maintenance(driver: WebDriver) -> str:
    """The host page's maintenance badge: "entering", "in", or "" when there is none."""
    return _attr(css(driver, "#host-summary #maintenance-badge"), "data-maintenance")


def tree_maintenance(driver: WebDriver, host: str) -> str:
    return _attr(tree_item(driver, "host", host), "data-maintenance")


def open_host(driver: WebDriver, host: str) -> None:
    open_item(driver, "host", host)
    wait(f"{host}'s summary", lambda: _text(css(driver, "#host-summary h1")) == host)


def blocker_row(driver: WebDriver, vm: str) -> WebElement | None:
    return css(driver, f'#maintenance-blockers tr[data-blocker="{vm}"]')


def test_enter_maintenance_from_the_host_page_shows_moves_and_the_blocker_then_exit(
    center: httpx.Client, vms: None, browser: WebDriver
) -> None:
    open_host(browser, SRC)
    assert host_maintenance(browser) == "" and tree_maintenance(browser, SRC) == ""
    assert css(browser, "#maintenance-panel") is None
    click(browser, "#maintenance-enter-btn")
    dialog = wait("the maintenance dialog", lambda: css(browser, "#maintenance-dialog"))
    said = dialog.text
    assert "live-migrated" in said and "takes no new VMs" in said, said
    for vm in [*MOVABLE, BLOCKER]:
        assert vm in said, said  # the running VMs it will move
    shot(browser, "30-maintenance-dialog")
    click(browser, "#maintenance-confirm")
    wait("the dialog to close", lambda: css(browser, "#maintenance-dialog") is None)

    # Entering: the badge, the tree's mark, and the panel with the task's progress.
    wait("the host's badge to say entering", lambda: host_maintenance(browser) == "entering")
    assert "Entering maintenance" in _text(css(browser, "#maintenance-badge"))
    wait("the tree to mark the host", lambda: tree_maintenance(browser, SRC) == "entering")
    mark = css(browser, f'#tree [data-kind="host"][data-name="{SRC}"] .maint-mark')
    assert mark is not None and "entering maintenance" in (mark.get_attribute("title") or "")
    panel = wait("the evacuation panel", lambda: css(browser, "#maintenance-panel"))
    task_id = int(panel.get_attribute("data-task") or 0)
    assert task_id, panel.get_attribute("outerHTML")
    task = center.get(f"/v1/tasks/{task_id}").json()
    assert task["kind"] == "maintenance" and task["target"] == SRC, task

    # The blocker, with its reason naming the datastore only .172 sees.
    row = wait("the blocker in the panel", lambda: blocker_row(browser, BLOCKER), ROUND_S)
    reason = row.find_element(By.CSS_SELECTOR, "td.reason").text
    assert "local-172" in reason, reason
    wait(
        "the moves in the panel",
        lambda: (
            css(browser, "#maintenance-moving tr[data-moving]")
            or css(browser, "#maintenance-moved tr[data-moved]")
        ),
        ROUND_S,
    )
    shot(browser, "31-maintenance-entering")

    # The two shared VMs move to .173: the tree says so, the panel lists them as moved.
    wait(
        f"{' and '.join(MOVABLE)} under {DST} in the tree",
        lambda: all(host_of_vm_in_tree(browser, vm) == DST for vm in MOVABLE),
        MOVES_S,
    )
    wait(
        "both moved in the panel",
        lambda: all(css(browser, f'#maintenance-moved tr[data-moved="{vm}"]') for vm in MOVABLE),
        ROUND_S,
    )
    assert host_of_vm_in_tree(browser, BLOCKER) == SRC
    wait(
        "the panel to say the host is blocked",
        lambda: "Blocked" in _text(css(browser, "#maintenance-phase")),
        ROUND_S,
    )
    reason = wait("the blocker still shown", lambda: blocker_row(browser, BLOCKER)).text
    assert "local-172" in reason, reason
    assert host_maintenance(browser) == "entering"
    shot(browser, "32-maintenance-blocked")

    # Recent Tasks and the task's page show it as a maintenance task, not a migration.
    task_row = wait(
        "the task in Recent Tasks", lambda: css(browser, f'#tasks [data-task-id="{task_id}"]')
    )
    assert _text(task_row.find_element(By.CSS_SELECTOR, ".vm")) == SRC
    assert _text(task_row.find_element(By.CSS_SELECTOR, ".type")) == "enter maintenance"
    assert _text(task_row.find_element(By.CSS_SELECTOR, ".phase")) == "blocked"
    assert BLOCKER in _text(task_row.find_element(By.CSS_SELECTOR, ".route"))
    click(browser, f'#maintenance-panel a[href="#/task/{task_id}"]')
    detail = wait("the task's page", lambda: css(browser, '#task-detail[data-kind="maintenance"]'))
    assert SRC in _text(css(browser, "#task-detail h1"))
    assert css(browser, "#task-chart") is None, "a maintenance task has no migration chart"
    row = wait("the blocker on the task's page", lambda: blocker_row(browser, BLOCKER))
    assert "local-172" in row.text, row.text
    for vm in MOVABLE:
        assert css(browser, f'#task-detail #maintenance-moved tr[data-moved="{vm}"]'), detail.text
    shot(browser, "33-maintenance-task")

    # The admin resolves the blocker: powers it off from its page.
    open_item(browser, "vm", BLOCKER)
    wait(f"{BLOCKER}'s summary", lambda: _text(css(browser, "#vm-summary h1")) == BLOCKER)
    click(browser, "#power-off-btn")
    click(browser, "#confirm-ok")
    wait(
        f"{BLOCKER} powered off",
        lambda: _value(css(browser, '#vm-summary [data-field="power_state"]')) == "poweredOff",
        60,
    )
    # Its host takes nothing new: the page says what Power on does (place it on another host
    # first), and for this VM no other host can take it (its disk is on local-172).
    note = wait("the maintenance note", lambda: css(browser, "#vm-maintenance-note"))
    assert SRC in note.text and "another host" in note.text, note.text
    click(browser, "#power-on-btn")
    message = "#action-message"
    wait("the refusal", lambda: "host_in_maintenance" in _text(css(browser, message)))
    assert "local-172" in _text(css(browser, message)), _text(css(browser, message))
    assert center.get(f"/v1/vms/{BLOCKER}").json()["power_state"] == "poweredOff"
    shot(browser, "34-maintenance-blocker-off")

    # The host empties: in maintenance.
    open_host(browser, SRC)
    wait("the host in maintenance", lambda: host_maintenance(browser) == "in", ROUND_S * 2)
    assert "In maintenance" in _text(css(browser, "#maintenance-badge"))
    wait("the tree to mark it in maintenance", lambda: tree_maintenance(browser, SRC) == "in")
    wait(
        "the panel to say in maintenance",
        lambda: _attr(css(browser, "#maintenance-panel"), "data-maintenance") == "in",
    )
    assert _enabled(css(browser, "#maintenance-exit-btn"))
    assert not _enabled(css(browser, "#maintenance-enter-btn"))
    task = center.get(f"/v1/tasks/{task_id}").json()
    assert task["state"] == "success" and task["phase"] == "in maintenance", task
    assert sorted(task["summary"]["moved"]) == MOVABLE, task["summary"]
    assert center.get(f"/v1/hosts/{SRC}").json()["maintenance"] == "in"
    shot(browser, "35-maintenance-in")

    # The Migrate wizard says why .172 takes no VM.
    open_item(browser, "vm", MOVABLE[0])
    wait(f"{MOVABLE[0]}'s summary", lambda: _text(css(browser, "#vm-summary h1")) == MOVABLE[0])
    click(browser, "#migrate-btn")
    click(browser, 'input[name="mtype"][value="compute"]')
    click(browser, "#wizard-next")
    candidate = wait(
        f"{SRC}'s compatibility check",
        lambda: _checked(css(browser, f'[data-candidate-host="{SRC}"]')),
        60,
    )
    verdict = candidate.find_element(By.CSS_SELECTOR, ".compat").text
    assert verdict.startswith("Errors") and "maintenance" in verdict, verdict
    assert "host_in_maintenance" in verdict, verdict
    shot(browser, "36-maintenance-wizard")
    click(browser, "#wizard-cancel")
    wait("the wizard to close", lambda: css(browser, "#wizard") is None)

    # Exit from the host's page.
    open_host(browser, SRC)
    click(browser, "#maintenance-exit-btn")
    wait("the badge to go", lambda: host_maintenance(browser) == "", 30)
    wait("the tree's mark to go", lambda: tree_maintenance(browser, SRC) == "", 30)
    wait("the panel to go", lambda: css(browser, "#maintenance-panel") is None)
    assert "exited maintenance mode" in _text(css(browser, "#action-message"))
    assert center.get(f"/v1/hosts/{SRC}").json()["maintenance"] is None
    shot(browser, "37-maintenance-exited")
    no_js_errors(browser)


def test_balancing_on_the_cluster_page_saves_settings_and_shows_a_pass(
    center: httpx.Client, vms: None, browser: WebDriver
) -> None:
    """Last in the module: it moves no VM and leaves the cluster's balancing off. On the page of
    a cluster of the lab's hosts the user sets balancing to manual at threshold 5 and saves it
    (then off again), then gets recommendations: every member host's CPU and memory load, and
    each recommended move with its reason (not applied: the tests above depend on where the
    VMs are), or why there is none; the page opened again shows the same pass, not a new one."""
    members, cluster = cluster_of_all_hosts(center)
    balancing = f"/v1/clusters/{cluster}/balancing"
    try:
        open_item(browser, "cluster", cluster)
        mode = wait("the balancing settings", lambda: css(browser, "#balancing-mode"))
        Select(mode).select_by_value("manual")
        Select(wait("the threshold", lambda: css(browser, "#balancing-threshold"))).select_by_value(
            "5"
        )
        click(browser, "#balancing-save")
        saved = wait("the settings saved", lambda: _text(css(browser, "#balancing-result")))
        assert "manual" in saved and "threshold 5" in saved, saved
        settings = center.get(balancing).json()["settings"]
        assert (settings["mode"], settings["threshold"]) == ("manual", 5), settings
        assert _attr(css(browser, "#balancing-mode-badge"), "data-mode") == "manual"
        # Off again from the page: the center's own passes (every minute unless off) would
        # replace the latest pass while it is compared below. A pass asked for runs anyway.
        Select(wait("the mode", lambda: css(browser, "#balancing-mode"))).select_by_value("off")
        click(browser, "#balancing-save")
        wait("off saved", lambda: "balancing off" in _text(css(browser, "#balancing-result")))
        assert center.get(balancing).json()["settings"]["mode"] == "off"

        before = _attr(css(browser, ".balancing-pass"), "data-at")  # a pass of the center's own

        def new_pass() -> str:
            shown = _attr(css(browser, ".balancing-pass"), "data-at")
            return shown if shown != before and _enabled(css(browser, "#balancing-run")) else ""

        click(browser, "#balancing-run")
        at = wait("the pass asked for", new_pass, 60)
        loads = {
            _attr(row, "data-host"): row.text
            for row in browser.find_elements(By.CSS_SELECTOR, "#balancing-hosts tbody tr")
        }
        assert sorted(loads) == members, loads
        for host, text in loads.items():
            assert text.count("%") == 2, f"{host}: {text}"  # its CPU and memory shares
        assert "Imbalance" in _text(css(browser, "#balancing-imbalance"))
        latest = center.get(balancing).json()["latest"]
        assert latest["at"] == at, (latest["at"], at)
        rows = browser.find_elements(By.CSS_SELECTOR, "#balancing-recommendations tbody tr")
        assert len(rows) == len(latest["recommendations"]), latest
        for row, rec in zip(rows, latest["recommendations"], strict=True):
            assert row.get_attribute("data-vm") == rec["vm"]
            assert rec["reason"] and rec["reason"] in row.text, (rec["reason"], row.text)
            assert row.find_element(By.CSS_SELECTOR, "button[data-apply]").is_enabled()
        if not rows:
            why = _text(css(browser, "#balancing-why"))
            assert why.startswith("No move recommended") and latest["why_no_more"] in why, why
            for vm in latest["held"]:
                assert vm in _text(css(browser, "#balancing-held"))
        browser.execute_script("arguments[0].scrollIntoView()", css(browser, "#balancing"))
        shot(browser, "38-balancing-pass")

        # Opened again (a new page load), the card shows the latest pass: no new one is run.
        browser.refresh()
        shown = wait(
            "the latest pass again", lambda: _attr(css(browser, ".balancing-pass"), "data-at")
        )
        assert shown == at and center.get(balancing).json()["latest"]["at"] == at
        no_js_errors(browser)
    finally:
        center.put(balancing, json={"mode": "off", "threshold": 3})
    assert center.get(balancing).json()["settings"]["mode"] == "off"


def test_a_recommendation_applied_from_the_cluster_page_moves_a_busy_guest(
    lab: topology.LabState, center: httpx.Client, vms: None, browser: WebDriver
) -> None:
    """Both movable guests burn a CPU on one host; from the cluster's page the user gets
    recommendations and applies the first: its row links the migration's task, and the VM
    lands on the other host. (Balancing stays off: a pass asked for runs anyway, and no pass
    of the center's own replaces the one on the page meanwhile.)"""
    _, cluster = cluster_of_all_hosts(center)
    hosts_now = {v["name"]: v["host"] for v in center.get("/v1/vms").json()}
    busy_host = hosts_now[MOVABLE[0]]
    if hosts_now[MOVABLE[1]] != busy_host:  # put them together
        r = center.post(f"/v1/vms/{MOVABLE[1]}/migrate", json={"host": busy_host})
        assert r.status_code == 202, r.text
        wait(f"{MOVABLE[1]} on {busy_host}", lambda: center.get(f"/v1/vms/{MOVABLE[1]}")
             .json()["host"] == busy_host, timeout=MOVES_S)  # fmt: skip
    balancing = f"/v1/clusters/{cluster}/balancing"
    # not on the page: the shortest window, and no hold (maintenance has just moved them)
    r = center.put(balancing, json={"mode": "off", "threshold": 3, "window_s": 10, "hold_s": 0})
    assert r.status_code == 200, r.text
    guests = [wait_for_guest(lab, guest_ip(i)) for i in range(len(MOVABLE))]
    try:
        for guest in guests:
            guest.dirty(0, 1)  # a CPU burnt each
        open_item(browser, "cluster", cluster)
        wait("the balancing card", lambda: css(browser, "#balancing-run"))
        time.sleep(12)  # a window of samples with both guests busy

        def recommended() -> WebElement | None:
            """The first recommendation's row once a pass shows one; else a new pass."""
            row = css(browser, "#balancing-recommendations tbody tr[data-state='pending']")
            if row is not None:
                return row
            button = _enabled(css(browser, "#balancing-run"))
            if button is not None:
                button.click()
            return None

        row = wait("a recommendation", recommended, timeout=120)
        vm = row.get_attribute("data-vm")
        assert vm in MOVABLE, vm
        assert f"{busy_host} CPU" in row.text, row.text
        shot(browser, "39-balancing-recommendation")
        row.find_element(By.CSS_SELECTOR, "button[data-apply]").click()
        link = wait("the applied move's task", lambda: css(
            browser, f"#balancing-recommendations tr[data-vm='{vm}'] a[data-task]"))  # fmt: skip
        task_id = int(link.get_attribute("data-task") or 0)
        wait("the move to succeed", lambda: center.get(f"/v1/tasks/{task_id}").json()["state"]
             == "success", timeout=MOVES_S)  # fmt: skip
        assert center.get(f"/v1/vms/{vm}").json()["host"] != busy_host
        shot(browser, "40-balancing-applied")
        no_js_errors(browser)
    finally:
        for guest in guests:
            guest.dirty_stop()
            guest.close()
        center.put(balancing, json={"mode": "off", "window_s": 300, "hold_s": 600})


def test_a_host_page_shows_its_ha_state_and_why(
    center: httpx.Client, vms: None, browser: WebDriver
) -> None:
    """HA on for a cluster of the lab's hosts: a host's page says "HA: connected"; its
    management link cut, the page says it is isolated, with the reason (its datastore
    heartbeat still lives); mended, connected again. Nothing is restarted (leave-on)."""
    _, cluster = cluster_of_all_hosts(center)
    ha = f"/v1/clusters/{cluster}/ha"
    try:
        assert center.put(ha, json={"enabled": True, "failure_s": 8}).status_code == 200
        open_host(browser, DST)

        def badge() -> str:
            return _attr(css(browser, "#ha-badge"), "data-ha")

        wait("HA connected", lambda: badge() == "connected")
        topology.set_link_up(DST, False, "management")
        wait("HA isolated", lambda: badge() == "isolated", timeout=60)
        reason = _text(css(browser, "#ha-reason"))
        assert "isolated" in reason and "datastore heartbeat lives on shared" in reason, reason
        shot(browser, "41-host-ha-isolated")
        # The cluster's page: each member's HA state, the reserve, no restarts.
        open_item(browser, "cluster", cluster)

        def row(host: str) -> str:
            return _text(css(browser, f'#ha-card tr[data-ha-host="{host}"]'))

        wait("the cluster's HA card", lambda: "isolated" in row(DST))
        assert "connected" in row(SRC)
        reserve = _text(css(browser, "#ha-reserve"))
        assert "1 host failure(s) tolerated" in reserve, reserve
        assert "No HA restarts" in _text(css(browser, "#ha-card"))
        shot(browser, "41-cluster-ha")
        topology.set_link_up(DST, True, "management")
        wait("HA connected again", lambda: "connected" in row(DST), timeout=60)
        open_host(browser, DST)
        wait("the host's badge", lambda: badge() == "connected")
        assert css(browser, "#ha-reason") is None
        assert center.get(ha).json()["restarts"] == []
        no_js_errors(browser)
    finally:
        topology.set_link_up(DST, True, "management")
        center.put(ha, json={"enabled": False})


def cluster_of_all_hosts(center: httpx.Client) -> tuple[list[str], str]:
    """The lab's hosts and a cluster of exactly them (the lab's own, or one made here)."""
    members = sorted(x["name"] for x in center.get("/v1/hosts").json())
    clusters = {c["name"]: c["hosts"] for c in center.get("/v1/clusters").json()}
    cluster = next((n for n, hosts in clusters.items() if hosts == members), DRS_CLUSTER)
    if cluster not in clusters:
        assert center.post("/v1/clusters", json={"name": cluster}).status_code == 201
        for host in members:
            r = center.post(f"/v1/clusters/{cluster}/hosts", json={"host": host})
            assert r.status_code == 200, r.text
    return members, cluster


def _text(element: WebElement | None) -> str:
    return element.text.strip() if element is not None else ""


def _attr(element: WebElement | None, name: str) -> str:
    return (element.get_attribute(name) or "") if element is not None else ""


def _value(element: WebElement | None) -> str:
    return _attr(element, "data-value")


def _enabled(element: WebElement | None) -> WebElement | None:
    return element if element is not None and element.is_enabled() else None


def _disabled(element: WebElement | None) -> WebElement | None:
    return element if element is not None and not element.is_enabled() else None


def _checked(candidate: WebElement | None) -> WebElement | None:
    """A wizard candidate whose compatibility has been checked (its verdict is shown)."""
    if candidate is None:
        return None
    verdict = candidate.find_elements(By.CSS_SELECTOR, ".compat")
    text = verdict[0].text if verdict else ""
    return candidate if text.startswith(("Compatible", "Warnings", "Errors")) else None
