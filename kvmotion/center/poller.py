"""Asking the agents what they have, in a process of its own.

A refresh round asks every host for its facts and its VM list: at 1,000 hosts, 2,000 HTTPS
calls and their answers checked, encoded and fingerprinted, about 2 ms of CPU a host. On the
center's event loop, a round kept the loop 80-92 % busy for its 2.5 s, and every API request
that came meanwhile queued behind it (bench/results/fleet.md, point 13). A thread does not
help: Python's interpreter lock makes each of a request's waits for I/O a wait for the lock.

So the center starts a poller process (``python -m kvmotion.center.poller``) and sends it, on
its stdin, one line of JSON per question: an agent's URL and token, and the fingerprint of the
VM list the inventory last agreed with. The poller asks the agent with its own clients (their
connections kept), and answers on its stdout, one line each: the facts, the VM list's
fingerprint, and the list itself only when the fingerprint differs (most rounds, most hosts:
no list). The center compares and writes (center/inventory.py); the poller only asks.

The poller is started at the first question, and again if it dies (the questions in flight
fail with ``PollerStopped``, which does not mark a host disconnected). Given the caller's
``Agents`` (tests' fake agents over a transport, whose state lives in the caller), the
questions are asked in-process, the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import signal
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from kvmotion import errors
from kvmotion.errors import KvmotionError
from kvmotion.host.client import AgentClient
from kvmotion.host.protocol import facts_json, vm_json
from kvmotion.mgmttls import agents_context

log = logging.getLogger(__name__)

RESTART_GAP_S = 5.0  # a poller that died is started again at most this often
# An answer comes within two agent calls' timeouts (host/client.py: 30 s each); a poller
# silent longer is stuck, and is killed (its questions fail; it starts again).
ANSWER_TIMEOUT_S = 75.0
STOP_TIMEOUT_S = 5.0
LINE_LIMIT = 64 * 2**20  # one answer: a host's VM list (10,000 VMs' records: about 8 MB)


def digest(value: Any) -> str:
    """A fingerprint of a JSON value (kept instead of the value: 10,000 VMs' records held as
    objects lengthen every full pass of the garbage collector)."""
    encoded = json.dumps(value, separators=(",", ":")).encode()
    return hashlib.blake2b(encoded, digest_size=16).hexdigest()


class PollerStopped(KvmotionError):
    """The poller process stopped while asking: nothing is known of the host (it is not
    marked disconnected for this)."""

    code = "poller_stopped"


@dataclass(frozen=True)
class Polled:
    """One agent's answer: its facts, when its VM list was read (``time.monotonic``: one
    clock for every process of the machine), the list's fingerprint (:func:`digest`), and the
    list, or None when its fingerprint is the one the question said was known."""

    facts: dict[str, Any]
    listed_at: float
    vms_digest: str
    vms: list[dict[str, Any]] | None


async def ask(agent: AgentClient, known: str | None) -> dict[str, Any]:
    """What the poller answers of ``agent`` (a JSON object): see :class:`Polled`."""
    facts = facts_json(await agent.facts())
    listed_at = time.monotonic()
    vms = [vm_json(info) for info in await agent.list_vms()]
    listed = digest(vms)
    return {"facts": facts, "listed_at": listed_at, "vms_digest": listed,
            "vms": None if listed == known else vms}  # fmt: skip


def _polled(answer: dict[str, Any]) -> Polled:
    if "error" in answer:
        error = answer["error"]
        cls = getattr(errors, str(error.get("type")), None)
        if not (isinstance(cls, type) and issubclass(cls, KvmotionError)):
            cls = errors.ExecutionError
        raise cls(str(error["message"]), code=error.get("code"), **(error.get("details") or {}))
    return Polled(answer["facts"], answer["listed_at"], answer["vms_digest"], answer["vms"])


class Agents:
    """One client per agent (by URL and token), its connections reused across calls: the
    center's (center/inventory.py), and the poller's own."""

    def __init__(
        self, transport: httpx.AsyncBaseTransport | None, tls: ssl.SSLContext | None
    ) -> None:
        self.transport = transport
        self.tls = tls
        self._clients: dict[tuple[str, str], AgentClient] = {}

    def get(self, url: str, token: str) -> AgentClient:
        client = self._clients.get((url, token))
        if client is None:
            client = AgentClient(url, token, transport=self.transport, shared=True, verify=self.tls)
            self._clients[(url, token)] = client
        return client

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()


@dataclass
class _Child:
    """One poller process, the questions it holds (by number), and the task reading its
    answers."""

    proc: asyncio.subprocess.Process
    waiting: dict[int, asyncio.Future[dict[str, Any]]]
    reader: asyncio.Task[None] | None = None


class Poller:
    """``await poller.poll(url, token, known)``: the agent's :class:`Polled`. Errors are the
    agent client's (``HostUnreachable`` and the rest), or :class:`PollerStopped`."""

    def __init__(self, tls_dir: Path | None = None, inline: Agents | None = None) -> None:
        self.tls_dir = tls_dir  # the center's: the poller trusts the agents as the center does
        self._inline = inline  # the caller's clients, when it asks in-process (not closed here)
        self._child: _Child | None = None
        self._next_id = 0
        self._started_at = -RESTART_GAP_S
        self._start_lock = asyncio.Lock()
        self._closed = False
        self.starts = 0  # processes started (a test kills one)

    @property
    def pid(self) -> int | None:
        return self._child.proc.pid if self._child is not None else None

    async def poll(self, url: str, token: str, known: str | None = None) -> Polled:
        if self._inline is not None:
            return _polled(await ask(self._inline.get(url, token), known))
        child = await self._started()
        stdin = child.proc.stdin
        assert stdin is not None
        self._next_id += 1
        qid = self._next_id
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        child.waiting[qid] = answer
        try:
            line = json.dumps({"id": qid, "url": url, "token": token, "known": known})
            stdin.write(line.encode() + b"\n")
            await stdin.drain()
            return _polled(await asyncio.wait_for(answer, ANSWER_TIMEOUT_S))
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise PollerStopped(f"the poller process stopped: {exc!r}") from exc
        except TimeoutError:
            log.error("the poller process (pid %d) did not answer in %.0f s: killed",
                      child.proc.pid, ANSWER_TIMEOUT_S)  # fmt: skip
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()
            raise PollerStopped(f"the poller process did not answer about {url}") from None
        finally:
            child.waiting.pop(qid, None)

    async def _started(self) -> _Child:
        async with self._start_lock:
            if self._closed:
                raise PollerStopped("the center is stopping")
            child = self._child
            # (Its reader ends when it does: then its questions failed, new ones would wait.)
            if child is not None and child.reader is not None and not child.reader.done():
                return child
            wait = self._started_at + RESTART_GAP_S - time.monotonic()
            if wait > 0:
                raise PollerStopped(f"the poller process stopped; it starts again in {wait:.1f} s")
            self._started_at = time.monotonic()
            command = [sys.executable, "-m", "kvmotion.center.poller"]
            if self.tls_dir is not None:
                command += ["--tls-dir", str(self.tls_dir)]
            # Its stderr is the center's: what it logs lands in the center's log.
            try:
                proc = await asyncio.create_subprocess_exec(
                    *command,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    limit=LINE_LIMIT,
                )
            except OSError as exc:
                raise PollerStopped(f"the poller process could not start: {exc}") from exc
            child = self._child = _Child(proc, {})
            child.reader = asyncio.create_task(self._read(child), name="poller-answers")
            self.starts += 1
            log.info("started the poller process (pid %d)", proc.pid)
            return child

    async def _read(self, child: _Child) -> None:
        proc = child.proc
        assert proc.stdout is not None
        try:
            while line := await proc.stdout.readline():
                answer = json.loads(line)
                waiting = child.waiting.get(answer.pop("id"))
                if waiting is not None and not waiting.done():
                    waiting.set_result(answer)
        except Exception as exc:  # not an answer (ValueError, KeyError, an overlong line...)
            log.error("the poller process answered what is not an answer: %r", exc)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        finally:
            code = await proc.wait()
            if child.waiting:
                log.warning("the poller process (pid %d) ended (status %s) with %d questions "
                            "unanswered", proc.pid, code, len(child.waiting))  # fmt: skip
            stopped = PollerStopped(f"the poller process ended (status {code})")
            for waiting in list(child.waiting.values()):
                if not waiting.done():
                    waiting.set_exception(stopped)

    async def close(self) -> None:
        """Stop the poller process: its stdin closed, it ends; after ``STOP_TIMEOUT_S`` it is
        killed (by its pid)."""
        if self._inline is not None:
            return
        async with self._start_lock:
            self._closed = True
            child, self._child = self._child, None
        if child is None:
            return
        proc = child.proc
        if proc.returncode is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if child.reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await child.reader


# -- the poller process ----------------------------------------------------------------------
async def serve(tls_dir: Path | None) -> None:
    """Answer each question read on stdin (one JSON object a line), as it is answered, on
    stdout; end at the end of stdin, or when the center is gone."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer
    agents = Agents(None, agents_context(tls_dir) if tls_dir is not None else None)
    pending: set[asyncio.Task[None]] = set()

    async def answer(question: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"id": question["id"]}
        try:
            agent = agents.get(question["url"], question["token"])
            reply |= await ask(agent, question.get("known"))
        except KvmotionError as exc:
            reply["error"] = {"type": type(exc).__name__, "message": exc.message,
                              "code": exc.code, "details": exc.details}  # fmt: skip
        except Exception as exc:  # the center must hear of every question
            log.exception("asking %s failed", question.get("url"))
            reply["error"] = {"type": "ExecutionError", "message": f"the poller failed: {exc!r}"}
        line = json.dumps(reply, default=str).encode()
        if len(line) >= LINE_LIMIT:  # the center would stop reading this poller
            line = json.dumps(
                {
                    "id": question["id"],
                    "error": {
                        "type": "ExecutionError",
                        "code": "answer_too_long",
                        "message": f"the host's answer is {len(line)} bytes, over {LINE_LIMIT}",
                    },
                }
            ).encode()
        out.write(line + b"\n")
        out.flush()

    try:
        while line := await reader.readline():
            task = asyncio.create_task(answer(json.loads(line)))
            pending.add(task)
            task.add_done_callback(pending.discard)
    finally:
        for task in list(pending):
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await agents.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tls-dir", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The center ends it by closing its stdin; a Ctrl-C meant for the center is not for it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(serve(args.tls_dir))


if __name__ == "__main__":
    main()
