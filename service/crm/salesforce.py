"""Salesforce REST: Lead upsert by an external-id field.

`PATCH {instance}/services/data/{version}/sobjects/Lead/{ExternalIdField__c}/{value}` with the
mapped fields (default: Email, OwnerId, LastName, FirstName, Company and the stage, score and grade
as custom fields). When an owner is set, `Sforce-Auto-Assign: FALSE` keeps Salesforce's own
assignment rules from overriding our routing. Salesforce answers 201 (created) or 200/204
(updated); it reports exhausted API limits as 403 `REQUEST_LIMIT_EXCEEDED`, which is a rate limit,
not a rejection.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import httpx

from service.crm.base import MISSING, CrmReceipt, excerpt, json_body, lookup, map_fields, raise_for_status, send
from service.crm.config import SalesforceDestination
from service.crm.errors import CrmRateLimited, CrmRejected


class SalesforceAdapter:
    def __init__(self, config: SalesforceDestination) -> None:
        self.destination = config.name
        self._config = config
        root = config.base_url.rstrip("/")
        self._base = f"{root}/services/data/{config.api_version}/sobjects/Lead/{config.external_id_field}/"
        self._authorization = f"Bearer {config.bearer().get_secret_value()}"

    def request(self, payload: Mapping[str, Any]) -> tuple[str, dict[str, Any], dict[str, str]]:
        """The URL, body and extra headers for a payload."""
        key = lookup(payload, self._config.external_id_from)
        if key is MISSING or key in (None, ""):
            raise CrmRejected(f"the lead has no {self._config.external_id_from!r} for the external id")
        fields = map_fields(payload, self._config.fields, self._config.stage_values)
        # The external id is in the URL; Salesforce refuses it in the body too.
        fields.pop(self._config.external_id_field, None)
        headers = {"sforce-auto-assign": "FALSE"} if fields.get("OwnerId") else {}
        return self._base + quote(str(key), safe=""), fields, headers

    async def deliver(
        self, client: httpx.AsyncClient, payload: Mapping[str, Any], *, idempotency_key: str, now: dt.datetime
    ) -> CrmReceipt:
        url, body, extra = self.request(payload)
        headers = {"authorization": self._authorization, "idempotency-key": idempotency_key, **extra}
        response, took = await send(client, "PATCH", url, body=body, headers=headers)
        if response.status_code == 403 and _limit_exceeded(json_body(response)):
            raise CrmRateLimited(
                "Salesforce API request limit exceeded", retry_after=None, status_code=403, excerpt=excerpt(response)
            )
        raise_for_status(response, now)
        return CrmReceipt(status_code=response.status_code, excerpt=excerpt(response), duration_s=took)


def _limit_exceeded(answer: Any) -> bool:
    errors = answer if isinstance(answer, list) else [answer]
    return any(isinstance(e, dict) and e.get("errorCode") == "REQUEST_LIMIT_EXCEEDED" for e in errors)
