"""Every role boundary of the HTTP API: API keys and OpenID Connect tokens.

Tokens are signed with locally generated key pairs; the identity provider's JWKS is served by a
real HTTP server on 127.0.0.1 that the service fetches from, and counts the fetches.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from service.app import create_app
from service.auth import create_key
from service.db import create_engine
from service.settings import Settings
from tests.conftest import Db, Sender

pytestmark = pytest.mark.anyio

ISSUER = "https://idp.example.test/realms/acme"
AUDIENCE = "leadscore"
OPS_ROUTE = "/v1/keys"
VIEWER_ROUTE = "/v1/audit"


# --- API keys ------------------------------------------------------------------------------------


async def make_key(settings: Settings, role: str, **kw: Any) -> tuple[int, str]:
    engine = create_engine(settings.database_url)
    try:
        created = await create_key(engine, name=f"{role}-key", role=role, now=dt.datetime.now(dt.UTC), **kw)  # type: ignore[arg-type]
    finally:
        await engine.dispose()
    return created.id, created.key


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def assert_error(response: httpx.Response, status: int, error: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == error
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "lsk_no_scheme",
        "Bearer lsk_unknown",
        "Bearer not-a-jwt-either",
    ],
)
async def test_no_or_malformed_credential_is_401(client: httpx.AsyncClient, authorization: str | None) -> None:
    headers = {} if authorization is None else {"authorization": authorization}
    for route in (OPS_ROUTE, VIEWER_ROUTE):
        assert_error(await client.get(route, headers=headers), 401, "Unauthenticated")


async def test_a_webhook_signing_secret_is_not_an_api_credential(client: httpx.AsyncClient, sender: Sender) -> None:
    assert_error(await client.get(OPS_ROUTE, headers=bearer(sender.secret)), 401, "Unauthenticated")
    assert_error(await client.get(VIEWER_ROUTE, headers=bearer(sender.secret)), 401, "Unauthenticated")


async def test_viewer_reads_but_may_not_use_ops_routes(client: httpx.AsyncClient, settings: Settings) -> None:
    _, viewer = await make_key(settings, "viewer")
    assert (await client.get(VIEWER_ROUTE, headers=bearer(viewer))).status_code == 200
    assert_error(await client.get(OPS_ROUTE, headers=bearer(viewer)), 403, "Forbidden")
    create = await client.post(OPS_ROUTE, json={"name": "x", "role": "ops"}, headers=bearer(viewer))
    assert_error(create, 403, "Forbidden")
    assert_error(await client.delete(f"{OPS_ROUTE}/1", headers=bearer(viewer)), 403, "Forbidden")


async def test_ops_key_uses_ops_and_viewer_routes_and_marks_the_key_used(
    client: httpx.AsyncClient, settings: Settings, db: Db
) -> None:
    key_id, ops = await make_key(settings, "ops")
    assert await db.scalar("SELECT last_used_at FROM api_key WHERE id = :id", id=key_id) is None
    assert (await client.get(OPS_ROUTE, headers=bearer(ops))).status_code == 200
    first = await db.scalar("SELECT last_used_at FROM api_key WHERE id = :id", id=key_id)
    assert first is not None
    assert (await client.get(VIEWER_ROUTE, headers=bearer(ops))).status_code == 200
    second = await db.scalar("SELECT last_used_at FROM api_key WHERE id = :id", id=key_id)
    assert second is not None
    assert str(second) >= str(first)


async def test_expired_key_is_401(client: httpx.AsyncClient, settings: Settings) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    _, key = await make_key(settings, "ops", expires_at=past)
    assert_error(await client.get(OPS_ROUTE, headers=bearer(key)), 401, "Unauthenticated")


async def test_key_routes_create_list_and_revoke(client: httpx.AsyncClient, settings: Settings, db: Db) -> None:
    ops_id, ops = await make_key(settings, "ops")
    created = await client.post(
        OPS_ROUTE, json={"name": "grafana", "role": "viewer", "expires_in_days": 7}, headers=bearer(ops)
    )
    assert created.status_code == 201, created.text
    new = created.json()
    assert new["key"].startswith("lsk_")
    assert new["prefix"] == new["key"][:12]
    assert (new["role"], new["revoked_at"], new["last_used_at"]) == ("viewer", None, None)
    expires = dt.datetime.fromisoformat(new["expires_at"]) - dt.datetime.fromisoformat(new["created_at"])
    assert expires == dt.timedelta(days=7)
    # The new key works, with its role.
    assert (await client.get(VIEWER_ROUTE, headers=bearer(new["key"]))).status_code == 200
    assert_error(await client.get(OPS_ROUTE, headers=bearer(new["key"])), 403, "Forbidden")

    listed = await client.get(OPS_ROUTE, headers=bearer(ops))
    assert [k["id"] for k in listed.json()] == [ops_id, new["id"]]
    assert new["key"] not in listed.text
    assert all("key" not in k and "key_hash" not in k for k in listed.json())
    assert await db.scalar("SELECT count(*) FROM api_key WHERE key_hash = :h", h=new["key"]) == 0

    revoked = await client.delete(f"{OPS_ROUTE}/{new['id']}", headers=bearer(ops))
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] is not None
    assert "key" not in revoked.json()
    assert_error(await client.get(VIEWER_ROUTE, headers=bearer(new["key"])), 401, "Unauthenticated")
    assert_error(await client.delete(f"{OPS_ROUTE}/{new['id']}", headers=bearer(ops)), 409, "KeyRevoked")
    assert_error(await client.delete(f"{OPS_ROUTE}/999", headers=bearer(ops)), 404, "KeyNotFound")


@pytest.mark.parametrize(
    "body",
    [
        {"name": "x", "role": "admin"},
        {"name": "", "role": "ops"},
        {"role": "ops"},
        {"name": "x", "role": "ops", "expires_in_days": 0},
    ],
)
async def test_bad_key_requests_are_422(client: httpx.AsyncClient, settings: Settings, body: dict[str, Any]) -> None:
    _, ops = await make_key(settings, "ops")
    assert_error(await client.post(OPS_ROUTE, json=body, headers=bearer(ops)), 422, "InvalidRequest")


async def test_a_revoked_key_is_401_at_once(client: httpx.AsyncClient, settings: Settings) -> None:
    ops_id, ops = await make_key(settings, "ops")
    # An ops key may revoke itself; the next request with it is refused.
    assert (await client.delete(f"{OPS_ROUTE}/{ops_id}", headers=bearer(ops))).status_code == 200
    assert_error(await client.get(VIEWER_ROUTE, headers=bearer(ops)), 401, "Unauthenticated")


# --- OpenID Connect ------------------------------------------------------------------------------


@dataclass
class SigningKey:
    kid: str
    private: Any
    alg: str

    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        algorithm = RSAAlgorithm if self.alg.startswith("RS") else ECAlgorithm
        jwk: dict[str, Any] = algorithm.to_jwk(public, as_dict=True)
        return jwk | {"kid": self.kid, "use": "sig", "alg": self.alg}

    def public_pem(self) -> bytes:
        return bytes(
            self.private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


def rsa_key(kid: str) -> SigningKey:
    return SigningKey(kid, rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")


def ec_key(kid: str) -> SigningKey:
    return SigningKey(kid, ec.generate_private_key(ec.SECP256R1()), "ES256")


@dataclass
class IdentityProvider:
    """A JWKS endpoint on a real local HTTP server; `keys` is what it publishes right now."""

    url: str = ""
    keys: list[SigningKey] = field(default_factory=list)
    fetches: int = 0

    def token(self, key: SigningKey | None = None, *, kid: str | None = None, **claims: Any) -> str:
        key = key or self.keys[0]
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "u-ana", "iat": now, "exp": now + 300, "roles": ["ops"]}
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, key.private, algorithm=key.alg, headers={"kid": kid or key.kid})


@pytest.fixture(scope="module")
def published() -> tuple[SigningKey, SigningKey]:
    # Key generation is the slow part: once per module.
    return rsa_key("rsa-1"), ec_key("ec-1")


@pytest.fixture
def idp(published: tuple[SigningKey, SigningKey]) -> Iterator[IdentityProvider]:
    provider = IdentityProvider(keys=list(published))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            provider.fetches += 1
            body = json.dumps({"keys": [k.jwk() for k in provider.keys]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    provider.url = f"http://127.0.0.1:{server.server_address[1]}/protocol/openid-connect/certs"
    try:
        yield provider
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def oidc_settings(settings: Settings, jwks_url: str, **overrides: Any) -> Settings:
    values = settings.model_dump() | {
        "oidc_issuer": ISSUER,
        "oidc_audience": AUDIENCE,
        "oidc_jwks_url": jwks_url,
        "oidc_jwks_refresh_cooldown_seconds": 0,
        "oidc_leeway_seconds": 30,
    }
    return Settings(**(values | overrides), _env_file=None)  # type: ignore[call-arg]


async def oidc_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        yield client


@pytest.fixture
async def oidc(settings: Settings, idp: IdentityProvider) -> AsyncIterator[httpx.AsyncClient]:
    async for client in oidc_client(oidc_settings(settings, idp.url)):
        yield client


async def test_valid_ops_token_reaches_ops_routes_as_a_stable_oidc_subject(
    oidc: httpx.AsyncClient, idp: IdentityProvider, db: Db
) -> None:
    token = idp.token(sub="00u-ana", preferred_username="ana@acme.io")
    assert (await oidc.get(OPS_ROUTE, headers=bearer(token))).status_code == 200
    created = await oidc.post(OPS_ROUTE, json={"name": "from-sso", "role": "viewer"}, headers=bearer(token))
    assert created.status_code == 201
    [(actor, role)] = await db.rows("SELECT actor, role FROM audit_entry WHERE action = 'api_key.created'")
    assert (actor, role) == ("oidc:00u-ana", "ops")
    # API keys still work next to tokens.
    assert (await oidc.get(VIEWER_ROUTE, headers=bearer(created.json()["key"]))).status_code == 200


async def test_valid_viewer_token_reads_but_may_not_use_ops_routes(
    oidc: httpx.AsyncClient, idp: IdentityProvider
) -> None:
    ec = idp.keys[1]
    token = idp.token(ec, roles="viewer")  # a string claim, signed ES256
    assert (await oidc.get(VIEWER_ROUTE, headers=bearer(token))).status_code == 200
    assert_error(await oidc.get(OPS_ROUTE, headers=bearer(token)), 403, "Forbidden")


@pytest.mark.parametrize(
    ("claims", "detail"),
    [
        pytest.param({"iss": "https://evil.example.test"}, "another issuer", id="wrong-issuer"),
        pytest.param({"aud": "someone-else"}, "audience", id="wrong-audience"),
        pytest.param({"exp": -120}, "expired", id="expired"),  # times: seconds from when the test runs
        pytest.param({"nbf": 600}, "not valid yet", id="not-yet-valid"),
        pytest.param({"sub": None}, "'sub'", id="no-subject"),
        pytest.param({"exp": None}, "'exp'", id="no-expiry"),
    ],
)
async def test_invalid_claims_are_401(
    oidc: httpx.AsyncClient, idp: IdentityProvider, claims: dict[str, Any], detail: str
) -> None:
    # Relative to now, not to collection: a long suite must not turn "not yet valid" into valid.
    now = int(time.time())
    claims = {k: now + v if k in ("exp", "nbf") and v is not None else v for k, v in claims.items()}
    response = await oidc.get(VIEWER_ROUTE, headers=bearer(idp.token(**claims)))
    assert_error(response, 401, "Unauthenticated")
    assert detail in response.json()["detail"]


async def test_expiry_within_the_leeway_is_accepted(oidc: httpx.AsyncClient, idp: IdentityProvider) -> None:
    token = idp.token(exp=int(time.time()) - 5)  # leeway 30 s in these settings
    assert (await oidc.get(VIEWER_ROUTE, headers=bearer(token))).status_code == 200


async def test_a_token_signed_by_another_key_under_a_published_kid_is_401(
    oidc: httpx.AsyncClient, idp: IdentityProvider
) -> None:
    impostor = rsa_key("rsa-1")
    response = await oidc.get(VIEWER_ROUTE, headers=bearer(idp.token(impostor)))
    assert_error(response, 401, "Unauthenticated")
    assert "signature" in response.json()["detail"]


async def test_unknown_kid_is_401_until_the_provider_publishes_the_rotated_key(
    oidc: httpx.AsyncClient, idp: IdentityProvider
) -> None:
    assert (await oidc.get(VIEWER_ROUTE, headers=bearer(idp.token()))).status_code == 200
    assert idp.fetches == 1
    # Cached: no fetch for a known key.
    assert (await oidc.get(VIEWER_ROUTE, headers=bearer(idp.token()))).status_code == 200
    assert idp.fetches == 1

    rotated = rsa_key("rsa-2")
    token = idp.token(rotated)
    assert_error(await oidc.get(VIEWER_ROUTE, headers=bearer(token)), 401, "Unauthenticated")
    assert idp.fetches == 2  # the unknown kid made it look again

    idp.keys.append(rotated)  # the provider rotates
    assert (await oidc.get(VIEWER_ROUTE, headers=bearer(token))).status_code == 200
    assert idp.fetches == 3
    assert (await oidc.get(VIEWER_ROUTE, headers=bearer(token))).status_code == 200
    assert idp.fetches == 3


async def test_forged_kids_do_not_make_the_service_hammer_the_provider(
    settings: Settings, idp: IdentityProvider
) -> None:
    async for client in oidc_client(oidc_settings(settings, idp.url, oidc_jwks_refresh_cooldown_seconds=3600)):
        assert (await client.get(VIEWER_ROUTE, headers=bearer(idp.token()))).status_code == 200
        for i in range(5):
            forged = idp.token(kid=f"forged-{i}")
            assert_error(await client.get(VIEWER_ROUTE, headers=bearer(forged)), 401, "Unauthenticated")
        assert idp.fetches == 1


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"


def _claims() -> dict[str, Any]:
    now = int(time.time())
    return {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "iat": now, "exp": now + 300, "roles": ["ops"]}


async def test_alg_none_is_refused(oidc: httpx.AsyncClient, idp: IdentityProvider) -> None:
    for alg in ("none", "None", "NONE"):
        token = _unsigned({"alg": alg, "typ": "JWT", "kid": idp.keys[0].kid}, _claims()) + "."
        response = await oidc.get(OPS_ROUTE, headers=bearer(token))
        assert_error(response, 401, "Unauthenticated")
        assert "not accepted" in response.json()["detail"]


async def test_hs256_signed_with_the_public_key_is_refused(oidc: httpx.AsyncClient, idp: IdentityProvider) -> None:
    # The classic confusion: an HMAC "signature" keyed by the published RSA public key. PyJWT's own
    # encoder refuses to make one, so it is made by hand.
    rsa_published = idp.keys[0]
    signing_input = _unsigned({"alg": "HS256", "typ": "JWT", "kid": rsa_published.kid}, _claims())
    for secret in (rsa_published.public_pem(), json.dumps(rsa_published.jwk()).encode()):
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        response = await oidc.get(OPS_ROUTE, headers=bearer(f"{signing_input}.{_b64(mac)}"))
        assert_error(response, 401, "Unauthenticated")


async def test_an_algorithm_other_than_the_keys_own_is_refused(
    settings: Settings, idp: IdentityProvider, published: tuple[SigningKey, SigningKey]
) -> None:
    # RS384 is allowed here, but the published key is bound to RS256.
    rsa_published = published[0]
    token = jwt.encode(_claims(), rsa_published.private, algorithm="RS384", headers={"kid": rsa_published.kid})
    async for client in oidc_client(oidc_settings(settings, idp.url, oidc_algorithms=["RS256", "RS384"])):
        assert_error(await client.get(VIEWER_ROUTE, headers=bearer(token)), 401, "Unauthenticated")


async def test_a_token_without_kid_is_401(oidc: httpx.AsyncClient, idp: IdentityProvider) -> None:
    key = idp.keys[0]
    token = jwt.encode(_claims(), key.private, algorithm="RS256")
    assert_error(await oidc.get(VIEWER_ROUTE, headers=bearer(token)), 401, "Unauthenticated")


@pytest.mark.parametrize(
    "roles",
    [
        pytest.param(None, id="no-role-claim"),
        pytest.param([], id="empty"),
        pytest.param(["sales", "admins"], id="unmapped"),
        pytest.param({"ops": True}, id="not-a-list"),
    ],
)
async def test_a_valid_token_without_a_role_here_is_403(
    oidc: httpx.AsyncClient, idp: IdentityProvider, roles: Any
) -> None:
    response = await oidc.get(VIEWER_ROUTE, headers=bearer(idp.token(roles=roles)))
    assert_error(response, 403, "Forbidden")


async def test_role_map_and_nested_claim(settings: Settings, idp: IdentityProvider) -> None:
    configured = oidc_settings(
        settings,
        idp.url,
        oidc_role_claim="realm_access.roles",
        oidc_role_map={"marketing-ops": "ops", "sales": "viewer"},
    )
    async for client in oidc_client(configured):

        def token(*groups: str) -> dict[str, str]:
            return bearer(idp.token(roles=None, realm_access={"roles": list(groups)}))

        assert (await client.get(OPS_ROUTE, headers=token("sales", "marketing-ops"))).status_code == 200
        assert (await client.get(VIEWER_ROUTE, headers=token("sales"))).status_code == 200
        assert_error(await client.get(OPS_ROUTE, headers=token("sales")), 403, "Forbidden")
        # With a map, only the map counts: the bare role name is not a role.
        assert_error(await client.get(VIEWER_ROUTE, headers=token("ops")), 403, "Forbidden")


async def test_unreachable_provider_is_503(settings: Settings, idp: IdentityProvider) -> None:
    token = idp.token()
    async for client in oidc_client(oidc_settings(settings, "http://127.0.0.1:9/jwks", oidc_jwks_timeout_seconds=2)):
        response = await client.get(VIEWER_ROUTE, headers=bearer(token))
        assert response.status_code == 503
        assert response.json()["error"] == "IdentityProviderUnavailable"
        assert "retry-after" in response.headers


async def test_tokens_are_401_when_oidc_is_not_configured(client: httpx.AsyncClient, idp: IdentityProvider) -> None:
    assert_error(await client.get(VIEWER_ROUTE, headers=bearer(idp.token())), 401, "Unauthenticated")
    assert idp.fetches == 0


async def test_webhook_secret_is_401_with_oidc_configured(oidc: httpx.AsyncClient, sender: Sender) -> None:
    assert_error(await oidc.get(VIEWER_ROUTE, headers=bearer(sender.secret)), 401, "Unauthenticated")


@pytest.mark.parametrize(
    "overrides",
    [
        {"oidc_issuer": ISSUER},
        {"oidc_issuer": ISSUER, "oidc_audience": AUDIENCE},
        {"oidc_issuer": ISSUER, "oidc_audience": AUDIENCE, "oidc_jwks_url": "file:///etc/passwd"},
        {"oidc_algorithms": ["HS256"]},
        {"oidc_algorithms": ["none"]},
        {"oidc_algorithms": []},
        {"oidc_role_map": {"g": "admin"}},
    ],
)
def test_incomplete_or_unsafe_oidc_settings_are_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="oidc|OpenID|LEADSCORE_OIDC"):
        Settings(_env_file=None, **overrides)  # type: ignore[call-arg]


async def test_principal_subjects_of_keys_and_tokens_never_collide(
    oidc: httpx.AsyncClient, idp: IdentityProvider, settings: Settings, db: Db
) -> None:
    key_id, ops = await make_key(settings, "ops")
    # A token whose `sub` looks like a key subject is still an OIDC subject.
    token = idp.token(sub=f"key:{key_id}")
    for credential in (ops, token):
        body = {"name": f"n-{uuid.uuid4().hex[:6]}", "role": "viewer"}
        assert (await oidc.post(OPS_ROUTE, json=body, headers=bearer(credential))).status_code == 201
    actors = [r.actor for r in await db.rows("SELECT actor FROM audit_entry WHERE actor <> 'system' ORDER BY id")]
    assert actors == [f"key:{key_id}", f"oidc:key:{key_id}"]
