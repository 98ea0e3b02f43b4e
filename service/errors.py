"""The domain errors the service raises, and the one place that turns them into HTTP answers.

Every error body is `{"error": "<Name>", "detail": ...}`. Expected outcomes are never a 500.
"""

from __future__ import annotations

from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.responses import JsonResponse


class LeadscoreError(Exception):
    """Base of every error that becomes an HTTP answer. `status` is assigned here and nowhere else."""

    status: ClassVar[int] = 400
    headers: ClassVar[dict[str, str]] = {}

    def __init__(self, detail: Any = None) -> None:
        super().__init__(detail)
        self.detail = detail

    def response_headers(self) -> dict[str, str]:
        return dict(self.headers)


class InvalidSignature(LeadscoreError):
    """The webhook signature is missing, malformed, stale or does not match (401)."""

    status = 401


class Unauthenticated(LeadscoreError):
    """No credential, or one that is unknown, expired or revoked (401)."""

    status = 401
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(LeadscoreError):
    """The credential is valid but its role may not do this (403)."""

    status = 403


class NotFound(LeadscoreError):
    """The thing named in the path does not exist (404)."""

    status = 404


class UnknownSource(NotFound):
    """No enabled webhook source has this name (404)."""


class LeadNotFound(NotFound):
    """No lead has this id (404)."""


class PayloadTooLarge(LeadscoreError):
    """The body is over `LEADSCORE_MAX_BODY_BYTES` (413)."""

    status = 413


class UnsupportedMediaType(LeadscoreError):
    """The body is not JSON (415)."""

    status = 415


class InvalidJson(LeadscoreError):
    """The body is not parseable JSON (422)."""

    status = 422


class InvalidEvent(LeadscoreError):
    """The body is JSON but not a valid lead event; `detail` lists each bad field (422)."""

    status = 422


class UnknownLead(LeadscoreError):
    """A reported outcome names no lead Leadscore knows (by id, email or external id), or names two
    different leads; `detail` lists each such item (422)."""

    status = 422


class StorageUnavailable(LeadscoreError):
    """The database cannot be reached; the sender should retry later (503 with Retry-After)."""

    status = 503

    def __init__(self, detail: Any = None, *, retry_after: int = 5) -> None:
        super().__init__(detail)
        self.retry_after = retry_after

    def response_headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class IdentityProviderUnavailable(LeadscoreError):
    """The OpenID Connect provider's signing keys cannot be fetched or used (503 with Retry-After)."""

    status = 503
    headers = {"Retry-After": "30"}


class DeliveryNotFound(NotFound):
    """No delivery has this id (404)."""


class DeliveryNotReplayable(LeadscoreError):
    """Only a dead or delivered delivery can be replayed; this one is pending or in flight (409)."""

    status = 409


class InvalidCursor(LeadscoreError):
    """The page cursor is not one this service gave out (422)."""

    status = 422


class InvalidReportPeriod(LeadscoreError):
    """A report's `since`/`until` make an empty, reversed or too long period (422)."""

    status = 422


def error_response(exc: LeadscoreError) -> JsonResponse:
    return JsonResponse(
        {"error": type(exc).__name__, "detail": exc.detail},
        status_code=exc.status,
        headers=exc.response_headers(),
    )


def install_error_handlers(app: FastAPI) -> None:
    """Render domain errors, FastAPI's own validation errors and plain HTTP errors the same way."""

    async def on_domain_error(_: Request, exc: Exception) -> JsonResponse:
        assert isinstance(exc, LeadscoreError)
        return error_response(exc)

    async def on_validation_error(_: Request, exc: Exception) -> JsonResponse:
        assert isinstance(exc, RequestValidationError)
        detail = [{"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JsonResponse({"error": "InvalidRequest", "detail": detail}, status_code=422)

    async def on_http_error(_: Request, exc: Exception) -> JsonResponse:
        assert isinstance(exc, StarletteHTTPException)
        names = {404: "NotFound", 405: "MethodNotAllowed"}
        return JsonResponse(
            {"error": names.get(exc.status_code, "HTTPError"), "detail": exc.detail},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    app.add_exception_handler(LeadscoreError, on_domain_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
