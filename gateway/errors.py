"""Errors at the door, in OpenAI's shape, with the status codes clients' retry logic knows.

{"error": {"message": "...", "type": "...", "param": "tools", "code": "..."}}

`param` names the request's field at fault, as OpenAI's does (null when no one field is).

400 invalid_request_error   the body is wrong (the field, the value, the valid choices), or
                            no model of its chain can serve what it needs (tools, a JSON
                            schema, video: the capability, the chain, each model's reason)
401 authentication_error    no key, an unknown key, or a revoked one
403 permission_error        the key may not use this task class
404 not_found_error         an unknown model (or a job the key cannot see)
409 conflict_error          a job that has started cannot be revoked
413 invalid_request_error   the body is larger than the gateway takes
429 rate_limit_error        the key's budget or request limit (Retry-After)
502 upstream_error          every model of the chain failed (each one's reason)
503 no_usable_model         no model may take the job now (each one's reason)
504 timeout                 not finished in time: the job goes on (its id is given)
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from router.errors import CapabilityUnavailable, InvalidJob

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}
        self.extra = extra or {}

    def response(self) -> JSONResponse:
        error = {
            "message": self.message,
            "type": TYPES.get(self.status, "api_error"),
            "param": self.param,
            "code": self.code,
            **self.extra,
        }
        return JSONResponse({"error": error}, status_code=self.status, headers=self.headers)


def no_route(exc: Any) -> APIError:
    """503 for NoRouteAvailable: every model's reason, and when to try again."""
    reasons = [{"model": m, "reason": why} for m, why in exc.reasons]
    return APIError(
        503,
        str(exc),
        code="no_usable_model",
        extra={"models": reasons},
        headers={"Retry-After": "5"},
    )


def invalid_job(exc: InvalidJob) -> APIError:
    """400 for an InvalidJob, `param` naming the field; for CapabilityUnavailable (no model
    of the chain can serve what the request needs) the capabilities, the chain and each
    model's reason too."""
    if isinstance(exc, CapabilityUnavailable):
        reasons = [{"model": m, "reason": why} for m, why in exc.reasons]
        return APIError(
            400,
            str(exc),
            code="capability_unavailable",
            param=exc.param,
            extra={
                "capability": exc.capability,
                "capabilities": exc.capabilities,
                "chain": exc.chain,
                "models": reasons,
            },
        )
    return APIError(400, str(exc), code="invalid_request", param=exc.param)
