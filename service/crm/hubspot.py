"""HubSpot CRM v3: `POST /crm/v3/objects/contacts/batch/upsert` by email (delivery), and
`GET /crm/v3/objects/contacts/{id}` (enrichment: `fetch_contact`).

One contact per request (`inputs` of one, `idProperty: email`): the upsert itself is idempotent,
and a failure is then the failure of exactly one delivery. Properties come from the field mapping
(default: `email`, `hubspot_owner_id`, `lifecyclestage`, and the score and grade as custom
properties `leadscore_score`, `leadscore_grade`). HubSpot answers 200/201 with the contacts, 207
(or 200 with `errors`) when an input failed, 429 when over its rate limit.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import SecretStr

from service.crm.base import CrmReceipt, excerpt, json_body, map_fields, raise_for_status, send
from service.crm.config import HubSpotDestination
from service.crm.errors import CrmRejected, CrmTransportError

UPSERT_PATH = "/crm/v3/objects/contacts/batch/upsert"
CONTACT_PATH = "/crm/v3/objects/contacts/"


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


@dataclass(frozen=True, slots=True)
class HubSpotContact:
    """A contact as HubSpot's CRM API answered it: its id, the properties asked for (HubSpot leaves
    out those it does not define, and gives null for those unset), `updatedAt`, and the answer as
    received (kept with the events it becomes, as a webhook's raw body is)."""

    id: str
    properties: dict[str, Any]
    updated_at: str | None
    body: bytes
    status_code: int


async def fetch_contact(
    client: httpx.AsyncClient,
    *,
    base_url: str,
    token: SecretStr,
    contact_id: str,
    properties: Sequence[str],
    now: dt.datetime,
) -> HubSpotContact:
    """`GET /crm/v3/objects/contacts/{id}?properties=a,b` with the private-app token. Raises
    `CrmRateLimited` on 429 (with its `Retry-After`), `CrmTransportError` on 408/5xx, timeouts and
    connection failures or an answer that is not a contact, `CrmRejected` on any other 4xx (404: no
    such contact; 401/403: the token is wrong or lacks the contacts read scope)."""
    url = base_url.rstrip("/") + CONTACT_PATH + quote(contact_id, safe="")
    try:
        response = await client.get(
            url,
            params={"properties": ",".join(properties)},
            headers={"authorization": f"Bearer {token.get_secret_value()}", "accept": "application/json"},
        )
    except httpx.TimeoutException as exc:
        raise CrmTransportError(f"timed out: {type(exc).__name__}") from None
    except httpx.TransportError as exc:
        raise CrmTransportError(f"transport error: {type(exc).__name__}: {exc}") from None
    raise_for_status(response, now)
    answer = json_body(response)
    raw = answer.get("properties") if isinstance(answer, dict) else None
    if not isinstance(raw, dict):
        raise CrmTransportError(
            "HubSpot answered without the contact's properties",
            status_code=response.status_code,
            excerpt=excerpt(response),
        )
    updated = answer.get("updatedAt")
    return HubSpotContact(
        id=str(answer.get("id") or contact_id),
        properties=raw,
        updated_at=updated if isinstance(updated, str) else None,
        body=response.content,
        status_code=response.status_code,
    )
