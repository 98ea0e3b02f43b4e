"""Destinations: where handoffs go, which adapter speaks to each, and how fields are mapped.

Configured as a JSON list (`LEADSCORE_DELIVERY_DESTINATIONS`) or a JSON/YAML file
(`LEADSCORE_DELIVERY_DESTINATIONS_FILE`). Secrets are given by the name of an environment variable
(`secret_env`, `token_env`), or inline; they are `SecretStr` and never logged or shown.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, TypeAdapter, ValidationError, model_validator

_NAME = r"^[a-z0-9][a-z0-9_-]{0,63}$"


class InvalidDestinations(ValueError):
    """The destinations configuration is not valid; raised at start-up, naming what is wrong."""


class _Destination(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME, description="What deliveries name as their destination.")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="CRM field -> payload path (`email`, `traits.company`), `a|b` alternatives, `=text` constants.",
    )
    stage_values: dict[str, str] = Field(default_factory=dict, description="Leadscore stage -> the CRM's value for it.")

    def _secret(self, inline: SecretStr | None, env: str | None, what: str) -> SecretStr:
        if env:
            value = os.environ.get(env)
            if not value:
                raise InvalidDestinations(f"destination {self.name!r}: environment variable {env} is not set")
            return SecretStr(value)
        if inline is None or not inline.get_secret_value():
            raise InvalidDestinations(f"destination {self.name!r}: no {what} (give `{what}_env` or `{what}`)")
        return inline


class WebhookDestination(_Destination):
    """A generic JSON webhook signed with Standard Webhooks (`webhook-id` is the idempotency key)."""

    kind: Literal["webhook"]
    url: str = Field(pattern=r"^https?://")
    secret: SecretStr | None = Field(default=None, description="`whsec_<base64>`.")
    secret_env: str | None = None
    event_type: str = "lead.handoff"

    @model_validator(mode="after")
    def _check_secret(self) -> WebhookDestination:
        if not self.secret_env and self.secret is None:
            raise ValueError("a webhook destination needs `secret_env` or `secret`")
        return self

    def signing_secret(self) -> SecretStr:
        return self._secret(self.secret, self.secret_env, "secret")


HUBSPOT_FIELDS = {
    "email": "email",
    "hubspot_owner_id": "owner_id",
    "lifecyclestage": "stage",
    "leadscore_score": "score",
    "leadscore_grade": "grade",
}
HUBSPOT_STAGES = {"mql": "marketingqualifiedlead", "sql": "salesqualifiedlead"}


class HubSpotDestination(_Destination):
    """HubSpot CRM v3: contacts batch upsert by email, with a private-app token."""

    kind: Literal["hubspot"]
    base_url: str = Field(default="https://api.hubapi.com", pattern=r"^https?://")
    token: SecretStr | None = None
    token_env: str | None = None

    @model_validator(mode="after")
    def _defaults(self) -> HubSpotDestination:
        object.__setattr__(self, "fields", self.fields or dict(HUBSPOT_FIELDS))
        object.__setattr__(self, "stage_values", self.stage_values or dict(HUBSPOT_STAGES))
        return self

    def bearer(self) -> SecretStr:
        return self._secret(self.token, self.token_env, "token")


SALESFORCE_FIELDS = {
    "Email": "email",
    "OwnerId": "owner_id",
    "LastName": "traits.last_name|traits.lastname|email",
    "FirstName": "traits.first_name|traits.firstname",
    "Company": "traits.company|=Unknown",
    "Leadscore_Stage__c": "stage",
    "Leadscore_Score__c": "score",
    "Leadscore_Grade__c": "grade",
}


class SalesforceDestination(_Destination):
    """Salesforce REST: Lead upsert by an external-id field, with a bearer (OAuth access) token."""

    kind: Literal["salesforce"]
    base_url: str = Field(pattern=r"^https?://", description="The org's instance URL.")
    api_version: str = Field(default="v60.0", pattern=r"^v\d+\.\d$")
    external_id_field: str = Field(default="Leadscore_Id__c", pattern=r"^[A-Za-z][A-Za-z0-9_]*__c$")
    external_id_from: str = Field(default="lead_id", description="Payload path of the external id's value.")
    token: SecretStr | None = None
    token_env: str | None = None

    @model_validator(mode="after")
    def _defaults(self) -> SalesforceDestination:
        object.__setattr__(self, "fields", self.fields or dict(SALESFORCE_FIELDS))
        return self

    def bearer(self) -> SecretStr:
        return self._secret(self.token, self.token_env, "token")


Destination = Annotated[WebhookDestination | HubSpotDestination | SalesforceDestination, Field(discriminator="kind")]
_DESTINATIONS = TypeAdapter(list[Destination])


def parse_destinations(data: Any) -> dict[str, Destination]:
    """Validate a list of destination objects; names must be unique."""
    try:
        destinations = _DESTINATIONS.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise InvalidDestinations(f"invalid destinations: {problems}") from None
    by_name: dict[str, Destination] = {}
    for destination in destinations:
        if destination.name in by_name:
            raise InvalidDestinations(f"destination {destination.name!r} is configured twice")
        by_name[destination.name] = destination
    return by_name


def load_destinations(inline: str | None, path: Path | None) -> dict[str, Destination]:
    """Destinations from the JSON setting, else the file (JSON or YAML), else none."""
    if inline and inline.strip():
        try:
            data = yaml.safe_load(inline)  # JSON is YAML
        except yaml.YAMLError as exc:
            raise InvalidDestinations(f"LEADSCORE_DELIVERY_DESTINATIONS is not JSON: {exc}") from None
        return parse_destinations(data)
    if path is not None:
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise InvalidDestinations(f"cannot read destinations file {path}: {exc}") from None
        return parse_destinations(data or [])
    return {}
