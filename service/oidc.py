"""OpenID Connect bearer tokens (JWT) from the company's identity provider.

PyJWT checks the signature, `iss`, `aud`, `exp`, `nbf` and `iat`; its `PyJWKClient` fetches the
provider's JWKS, caches it, and refetches it when a token names an unknown key id (the provider
rotated its keys), at most once per cooldown. The fetch is blocking (urllib): it runs in a thread.

The key is chosen by the token's `kid` and its algorithm is the key's own (a PyJWK is bound to one
algorithm), and only asymmetric algorithms are accepted (settings), so neither `alg: none` nor an
HMAC token "signed" with a public key can pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import jwt
import structlog
from jwt import PyJWK, PyJWKClient

from service.auth import Principal, Role
from service.errors import Forbidden, IdentityProviderUnavailable, Unauthenticated
from service.settings import Settings

log = structlog.get_logger(__name__)

SUBJECT_PREFIX = "oidc:"
_DEFAULT_ROLE_MAP: Mapping[str, Role] = {"ops": "ops", "viewer": "viewer"}
_NAME_CLAIMS = ("preferred_username", "email", "name")


class OidcVerifier:
    """Turns a provider's JWT into a `Principal`, or raises `Unauthenticated` (401), `Forbidden`
    (403: a valid token without a role here) or `IdentityProviderUnavailable` (503)."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        jwks_url: str,
        algorithms: Sequence[str],
        role_claim: str,
        role_map: Mapping[str, Role],
        leeway_seconds: int,
        jwks_cache_seconds: float,
        jwks_refresh_cooldown_seconds: float,
        jwks_timeout_seconds: float,
    ) -> None:
        self._issuer = issuer
        self._audience = audience
        self._algorithms = list(algorithms)
        self._role_claim = role_claim
        self._role_map = dict(role_map) or dict(_DEFAULT_ROLE_MAP)
        self._leeway = leeway_seconds
        self._jwks = PyJWKClient(
            jwks_url,
            cache_jwk_set=True,
            lifespan=jwks_cache_seconds,
            cooldown_duration=jwks_refresh_cooldown_seconds,
            timeout=jwks_timeout_seconds,
            headers={"User-Agent": "leadscore"},
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> OidcVerifier | None:
        """The verifier the settings describe, or None when OpenID Connect is not configured."""
        if not (settings.oidc_issuer and settings.oidc_audience and settings.oidc_jwks_url):
            return None
        return cls(
            issuer=settings.oidc_issuer,
            audience=settings.oidc_audience,
            jwks_url=settings.oidc_jwks_url,
            algorithms=settings.oidc_algorithms,
            role_claim=settings.oidc_role_claim,
            role_map=settings.oidc_role_map,
            leeway_seconds=settings.oidc_leeway_seconds,
            jwks_cache_seconds=settings.oidc_jwks_cache_seconds,
            jwks_refresh_cooldown_seconds=settings.oidc_jwks_refresh_cooldown_seconds,
            jwks_timeout_seconds=settings.oidc_jwks_timeout_seconds,
        )

    async def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("the bearer token is neither an API key nor a well-formed JWT") from None
        alg = header.get("alg")
        if alg not in self._algorithms:
            raise Unauthenticated(f"token algorithm {alg!r} is not accepted; accepted: {', '.join(self._algorithms)}")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("the token names no signing key (`kid`)")
        key = await self._signing_key(kid)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iss", "aud", "sub"], "enforce_minimum_key_length": True},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("the token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("the token is not meant for this service (audience)") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("the token comes from another issuer") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("the token's signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"the token has no {exc.claim!r} claim") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"invalid token: {exc}") from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject or len(subject) > 255:
            raise Unauthenticated("the token's `sub` is not a string of 1-255 characters")
        name = next((claims[c] for c in _NAME_CLAIMS if isinstance(claims.get(c), str) and claims[c]), subject)
        return Principal(subject=SUBJECT_PREFIX + subject, role=self._role(claims), name=name)

    async def _signing_key(self, kid: str) -> PyJWK:
        try:
            # PyJWKClient serialises its fetches with a lock of its own; off the event loop either way.
            return await asyncio.to_thread(self._jwks.get_signing_key, kid)
        except jwt.PyJWKClientConnectionError as exc:
            log.warning("identity provider keys unreachable", error=str(exc))
            raise IdentityProviderUnavailable("the identity provider's keys cannot be fetched; retry later") from None
        except jwt.PyJWKSetError as exc:
            log.warning("identity provider keys unusable", error=str(exc))
            raise IdentityProviderUnavailable("the identity provider's keys cannot be used; retry later") from None
        except jwt.PyJWKClientError as exc:
            # An unknown `kid` even after a refetch (or within the refetch cooldown).
            log.info("token signed by an unknown key", kid=kid, error=str(exc))
            raise Unauthenticated("the token is signed by a key the identity provider does not publish") from None

    def _role(self, claims: Mapping[str, Any]) -> Role:
        raw = _claim(claims, self._role_claim)
        values = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
        roles = {self._role_map[v] for v in values if isinstance(v, str) and v in self._role_map}
        if "ops" in roles:
            return "ops"
        if "viewer" in roles:
            return "viewer"
        raise Forbidden(f"the token carries no role for this service in its {self._role_claim!r} claim")


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    """A claim by name; failing that, by a dotted path into nested objects (`realm_access.roles`).
    The whole name is tried first: namespaced claims are URLs full of dots."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value
