"""Every test leaves the test process as it found it.

A test (or a service it starts) that changes process-wide state breaks a later test, in the whole
suite only, and in an order nobody reads from the failure. So each test starts with the signal
handlers the session started with, and ends with the working directory, environment and handlers
it started with; the error names the test that changed them.

The session's own start matters too: a process that a non-interactive shell starts in the
background begins with SIGINT ignored, and Python then never raises KeyboardInterrupt (the Ctrl-C
test failed in CI only for that reason, issue 13). The session says so when it is.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

pytest_plugins = ["tests.databases"]

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE)


def _handlers() -> dict[str, Any]:
    return {signal.Signals(s).name: signal.getsignal(s) for s in SIGNALS}


def _process_state() -> dict[str, Any]:
    environ = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    return {"signal handlers": _handlers(), "cwd": os.getcwd(), "environ": environ}


def _changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    found = []
    for what, was in before.items():
        now = after[what]
        if isinstance(was, dict):
            keys = sorted(set(was) | set(now))
            found += [f"{what}[{k}]: {was.get(k)!r} -> {now.get(k)!r}" for k in keys
                      if was.get(k) != now.get(k)]  # fmt: skip
        elif was != now:
            found.append(f"{what}: {was!r} -> {now!r}")
    return found


_SESSION_HANDLERS: dict[str, Any] = {}
_previous = ["the session's start"]


def pytest_sessionstart(session: pytest.Session) -> None:
    _SESSION_HANDLERS.update(_handlers())
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN and reporter is not None:
        reporter.write_line(
            "note: SIGINT is ignored in this test process (inherited from the shell that "
            "started it); tests that press Ctrl-C reset it for the program they signal"
        )


@pytest.fixture(autouse=True)
def _leaves_the_process_as_it_found_it(request: pytest.FixtureRequest) -> Iterator[None]:
    leaked = _changes({"signal handlers": _SESSION_HANDLERS}, {"signal handlers": _handlers()})
    assert not leaked, f"changed since {_previous[0]} (or by this module's fixtures): {leaked}"
    before = _process_state()
    yield
    _previous[0] = request.node.nodeid
    changed = _changes(before, _process_state())
    assert not changed, f"this test changed process-wide state: {changed}"
