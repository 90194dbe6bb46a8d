"""Why a request was refused, as an HTTP status and a message that names the problem. Every endpoint
answers these as JSON `{"error": {"message", "type", "code"}}` (the shape OpenAI-style clients read)."""

from __future__ import annotations


class RequestRefused(Exception):
    status = 500
    kind = "internal_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        # a message may quote a client's text: lone surrogates in it would make the JSON answer unencodable
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "code": self.status}}


class BadRequest(RequestRefused):
    status, kind = 400, "invalid_request_error"


class NonFiniteOutput(RequestRefused):
    """A tower returned NaN or Inf for an input of a protocol without per-item errors. Not a 5xx: the
    same input fails the same way again, and clients (the openai one) retry 5xx answers."""

    status, kind = 422, "non_finite_output"


class Unauthorized(RequestRefused):
    status, kind = 401, "authentication_error"

    def __init__(self, message: str = "missing or invalid API key (send `Authorization: Bearer KEY`)"):
        super().__init__(message, {"WWW-Authenticate": "Bearer"})


class PayloadTooLarge(RequestRefused):
    status, kind = 413, "payload_too_large"


class Unavailable(RequestRefused):
    """Not ready yet, draining, or the queue is full: the client should come back after Retry-After."""

    status, kind = 503, "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message, {"Retry-After": str(max(1, int(retry_after_s)))})


class TimedOut(RequestRefused):
    status, kind = 504, "timeout"


class RequestTimeout(RequestRefused):
    """The body did not arrive in full within --body-timeout-s (a client that stalls or drips it)."""

    status, kind = 408, "request_timeout"


class NotFound(RequestRefused):
    status, kind = 404, "not_found"


class MethodNotAllowed(RequestRefused):
    status, kind = 405, "method_not_allowed"


class ShuttingDown(Unavailable):
    """Cut short by the shutdown deadline: the work was dropped, so the client may send it again elsewhere."""


# What the framework's own refusals (an unknown route, a wrong method) become, so they have our shape too.
BY_STATUS = {cls.status: cls for cls in (BadRequest, Unauthorized, NotFound, MethodNotAllowed, RequestTimeout,
                                         PayloadTooLarge, NonFiniteOutput, Unavailable, TimedOut)}


def refusal_for(status: int, message: str, headers: dict[str, str] | None = None) -> RequestRefused:
    """A RequestRefused of `status` (its documented type), for a refusal that did not start as one."""
    refusal = RequestRefused(message, headers)
    cls = BY_STATUS.get(status)
    refusal.status, refusal.kind = status, cls.kind if cls else ("invalid_request_error" if status < 500 else "internal_error")
    return refusal
