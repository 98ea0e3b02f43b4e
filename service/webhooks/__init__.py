"""Webhook sources: a signature scheme and a body mapper per sender family, chosen per source by name."""

from service.webhooks.base import BodyMapper, Mapped, RequestLine, SignatureScheme, SourceConfig, Verified
from service.webhooks.schemes import MAPPERS, SCHEMES, mapper_for, scheme_for
from service.webhooks.standard import StandardWebhooks

__all__ = [
    "MAPPERS",
    "SCHEMES",
    "BodyMapper",
    "Mapped",
    "RequestLine",
    "SignatureScheme",
    "SourceConfig",
    "StandardWebhooks",
    "Verified",
    "mapper_for",
    "scheme_for",
]
