"""The refusals a silo answers with, named like gRPC status codes so every transport maps them one to one.

A `SiloError` is raised by the silo's service object for a request it will
not serve, with a message a person can act on; the in-process client lets it
propagate and the gRPC servicer turns it into the status of the same name.
Anything else a handler raises is a bug and becomes INTERNAL.
"""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    """The statuses a silo answers with on purpose (grpc.StatusCode has the same names)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"        # the request is malformed: sizes, counts, encodings, values
    UNAUTHENTICATED = "UNAUTHENTICATED"          # no valid client certificate (missing, unknown party, revoked)
    PERMISSION_DENIED = "PERMISSION_DENIED"      # the caller is not allowed this RPC by the silo's policy
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"    # a rate limit, daily cap, concurrency or budget is used up
    FAILED_PRECONDITION = "FAILED_PRECONDITION"  # the silo cannot serve yet (no trained model, draining)
    UNIMPLEMENTED = "UNIMPLEMENTED"              # the server has no such method (a client of another version)
    UNAVAILABLE = "UNAVAILABLE"                  # the silo cannot be reached (client side only)
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"      # the silo did not answer in time (client side only)
    INTERNAL = "INTERNAL"                        # a bug on the silo's side; nothing about the request


class SiloError(Exception):
    """A silo refused or failed a request; `code` says how, the message says why and what to do."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"


def invalid(message: str) -> SiloError:
    """INVALID_ARGUMENT with `message` (the most common refusal, so it gets a short name)."""
    return SiloError(ErrorCode.INVALID_ARGUMENT, message)
