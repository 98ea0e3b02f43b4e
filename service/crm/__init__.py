"""The one place Leadscore knows CRMs: adapters per destination kind, their configuration and
their errors (`service.crm.errors`). Nothing outside this package sees a CRM's JSON."""

from __future__ import annotations

from service.crm.base import CrmAdapter, CrmReceipt, parse_retry_after
from service.crm.config import (
    Destination,
    HubSpotDestination,
    InvalidDestinations,
    SalesforceDestination,
    WebhookDestination,
    load_destinations,
    parse_destinations,
)
from service.crm.errors import CrmError, CrmRateLimited, CrmRejected, CrmTransportError
from service.crm.handoff import Handoff
from service.crm.hubspot import HubSpotAdapter, HubSpotContact, fetch_contact
from service.crm.salesforce import SalesforceAdapter
from service.crm.webhook import WebhookAdapter

__all__ = [
    "CrmAdapter",
    "CrmError",
    "CrmRateLimited",
    "CrmReceipt",
    "CrmRejected",
    "CrmTransportError",
    "Destination",
    "Handoff",
    "HubSpotContact",
    "HubSpotDestination",
    "InvalidDestinations",
    "SalesforceDestination",
    "WebhookDestination",
    "build_adapter",
    "fetch_contact",
    "load_destinations",
    "parse_destinations",
    "parse_retry_after",
]


def build_adapter(config: Destination) -> CrmAdapter:
    """The adapter for a destination; reads its secret (may raise `InvalidDestinations`)."""
    if isinstance(config, WebhookDestination):
        return WebhookAdapter(config)
    if isinstance(config, HubSpotDestination):
        return HubSpotAdapter(config)
    return SalesforceAdapter(config)
