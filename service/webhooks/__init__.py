"""Webhook signature schemes, one per sender family, chosen per source by name."""

from service.webhooks.schemes import SCHEMES, SignatureScheme, StandardWebhooks, Verified, scheme_for

__all__ = ["SCHEMES", "SignatureScheme", "StandardWebhooks", "Verified", "scheme_for"]
