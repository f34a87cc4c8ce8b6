"""The one error table: every domain error an API answers is raised again, as its own class, by
the client that reads the answer; and the CLI's exit code follows from the class."""

from __future__ import annotations

import json

import httpx
import pytest

from kvmotion.cli.output import exit_code
from kvmotion.errors import (
    Conflict,
    ExecutionError,
    Forbidden,
    HostUnreachable,
    InsufficientResources,
    InvalidInput,
    KvmotionError,
    NotFound,
    QemuError,
    Unauthorized,
)
from kvmotion.httpapi import error_from_response, error_response

ANSWERED = [InvalidInput, NotFound, Conflict, InsufficientResources, Unauthorized, Forbidden,
            HostUnreachable]  # fmt: skip


def answer_of(exc: KvmotionError) -> httpx.Response:
    sent = error_response(exc)
    return httpx.Response(sent.status_code, content=bytes(sent.body))


@pytest.mark.parametrize("cls", ANSWERED, ids=lambda c: c.__name__)
def test_an_answered_error_comes_back_as_its_class(cls: type[KvmotionError]) -> None:
    back = error_from_response(answer_of(cls("what went wrong", code="some_code")), "GET /x")
    assert type(back) is cls
    assert (back.code, back.message) == ("some_code", "what went wrong")


def test_a_refusal_for_a_read_only_user_is_a_refusal_in_the_cli() -> None:
    back = error_from_response(answer_of(Forbidden("user 'student' is read-only")), "POST /x")
    assert exit_code(back) == 3  # refused, nothing changed: not a failure (1)
    assert exit_code(error_from_response(answer_of(HostUnreachable("gone")), "GET /x")) == 1


def test_server_failures_and_odd_answers_are_execution_errors() -> None:
    back = error_from_response(answer_of(QemuError("QEMU died", code="qemu_failed")), "GET /x")
    assert type(back) is ExecutionError and back.code == "qemu_failed"
    odd = error_from_response(httpx.Response(418, content=b"teapot"), "GET /x")
    assert type(odd) is ExecutionError and odd.code == "http_error"
    assert "GET /x: HTTP 418 teapot" in odd.message
    unparsable = httpx.Response(404, content=json.dumps({"detail": "x"}).encode())
    assert type(error_from_response(unparsable, "GET /y")) is NotFound
