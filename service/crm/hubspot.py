"""HubSpot CRM v3: `POST /crm/v3/objects/contacts/batch/upsert` by email.

One contact per request (`inputs` of one, `idProperty: email`): the upsert itself is idempotent,
and a failure is then the failure of exactly one delivery. Properties come from the field mapping
(default: `email`, `hubspot_owner_id`, `lifecyclestage`, and the score and grade as custom
properties `leadscore_score`, `leadscore_grade`). HubSpot answers 200/201 with the contacts, 207
(or 200 with `errors`) when an input failed, 429 when over its rate limit.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

import httpx

from service.crm.base import CrmReceipt, excerpt, json_body, map_fields, raise_for_status, send
from service.crm.config import HubSpotDestination
from service.crm.errors import CrmRejected

UPSERT_PATH = "/crm/v3/objects/contacts/batch/upsert"


class HubSpotAdapter:
    def __init__(self, config: HubSpotDestination) -> None:
        self.destination = config.name
        self._config = config
        self._url = config.base_url.rstrip("/") + UPSERT_PATH
        self._authorization = f"Bearer {config.bearer().get_secret_value()}"

    def body(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        properties = map_fields(payload, self._config.fields, self._config.stage_values)
        email = properties.pop("email", None) or payload.get("email")
        if not email:
            raise CrmRejected("HubSpot upserts contacts by email and the lead has none")
        # HubSpot property values are strings.
        return {
            "inputs": [
                {
                    "idProperty": "email",
                    "id": str(email),
                    "properties": {"email": str(email), **{k: _text(v) for k, v in properties.items()}},
                }
            ]
        }

    async def deliver(
        self, client: httpx.AsyncClient, payload: Mapping[str, Any], *, idempotency_key: str, now: dt.datetime
    ) -> CrmReceipt:
        body = self.body(payload)
        headers = {"authorization": self._authorization, "idempotency-key": idempotency_key}
        response, took = await send(client, "POST", self._url, body=body, headers=headers)
        raise_for_status(response, now)
        answer = json_body(response)
        if response.status_code == 207 or (isinstance(answer, dict) and answer.get("errors")):
            raise CrmRejected(
                "HubSpot refused the contact", status_code=response.status_code, excerpt=excerpt(response)
            )
        return CrmReceipt(status_code=response.status_code, excerpt=excerpt(response), duration_s=took)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
