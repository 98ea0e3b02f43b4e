"""What can go wrong talking to a CRM, as the delivery worker needs to know it.

    CrmError                 base; carries the HTTP status and an excerpt of the answer, if any
    ├── CrmTransportError    no usable answer: connection refused or dropped, timeout, 408, 5xx -> retry
    ├── CrmRateLimited       429 (or the CRM's own rate-limit answer) -> retry after `retry_after`
    └── CrmRejected          any other 4xx, or an answer that says the record failed -> dead letter

Adapters raise only these; httpx's exceptions and the CRM's JSON never leave `service.crm`.
"""

from __future__ import annotations


class CrmError(Exception):
    """Base of every CRM failure."""

    def __init__(self, message: str, *, status_code: int | None = None, excerpt: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.excerpt = excerpt


class CrmTransportError(CrmError):
    """The CRM could not be reached or did not answer usefully; trying again may work."""


class CrmRateLimited(CrmError):
    """The CRM asked us to slow down; `retry_after` (seconds, if it said) is when to try again."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None,
        status_code: int | None = None,
        excerpt: str | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, excerpt=excerpt)
        self.retry_after = retry_after


class CrmRejected(CrmError):
    """The CRM refused the record; sending it again unchanged will not help (a dead letter)."""
