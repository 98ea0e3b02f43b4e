"""The source kinds: a signature scheme and a body mapper per name (`source.scheme`)."""

from __future__ import annotations

from service.webhooks.base import BodyMapper, SignatureScheme
from service.webhooks.hubspot import HubSpotMapper, HubSpotSignature
from service.webhooks.marketo import MarketoMapper, marketo_token
from service.webhooks.mautic import MauticMapper, MauticSignature
from service.webhooks.segment import BearerToken, SegmentSignature, SegmentSpecMapper
from service.webhooks.standard import StandardMapper, StandardWebhooks

_segment_spec = SegmentSpecMapper()

SCHEMES: dict[str, SignatureScheme] = {
    "standard": StandardWebhooks(),
    "hubspot": HubSpotSignature(),
    "segment": SegmentSignature(),
    "rudderstack": BearerToken("rudderstack", "authorization", bearer=True),
    "mautic": MauticSignature(),
    "marketo": marketo_token(),
}

MAPPERS: dict[str, BodyMapper] = {
    "standard": StandardMapper(),
    "hubspot": HubSpotMapper(),
    "segment": _segment_spec,
    "rudderstack": _segment_spec,
    "mautic": MauticMapper(),
    "marketo": MarketoMapper(),
}


def scheme_for(name: str) -> SignatureScheme:
    """The scheme registered under `name`; raises KeyError for an unknown one."""
    return SCHEMES[name]


def mapper_for(name: str) -> BodyMapper:
    """The body mapper of the source kind `name`; raises KeyError for an unknown one."""
    return MAPPERS[name]
