"""Users (TEXTGEN_AUTH=jwt): POST /token logs in with the OAuth2 password form, POST /register
makes an account (when TEXTGEN_REGISTRATION is on), GET /users/me says who a credential is."""

from __future__ import annotations

from typing import Any

from flask import current_app
from marshmallow import EXCLUDE, Schema, fields, validate

from textgen.api.auth import CHALLENGE, Guard, principal
from textgen.api.docs import Blueprint
from textgen.api.errors import Conflict, InvalidRequest, NotFound, Unauthorized
from textgen.api.fields import RequestSchema
from textgen.auth.passwords import MAX_LENGTH, WeakPassword
from textgen.auth.users import Account, UserError

bp = Blueprint("users", __name__, description="Users: log in for an access token (AUTH=jwt)")


class TokenFormSchema(Schema):
    """The OAuth2 password grant (RFC 6749 4.3), sent as a form."""

    class Meta:
        unknown = EXCLUDE  # client_id, client_secret, audience...: OAuth2 clients add them

    grant_type = fields.String(load_default="password")
    username = fields.String(required=True, validate=validate.Length(min=1, max=64))
    password = fields.String(required=True, validate=validate.Length(min=1, max=MAX_LENGTH))
    scope = fields.String(load_default="")


class TokenSchema(Schema):
    access_token = fields.String(required=True)
    token_type = fields.String(required=True, metadata={"example": "bearer"})
    expires_in = fields.Integer(required=True, metadata={"description": "seconds"})


class RegisterSchema(RequestSchema):
    username = fields.String(required=True, validate=validate.Length(min=1, max=64))
    password = fields.String(required=True, validate=validate.Length(min=1, max=MAX_LENGTH))


class AccountSchema(Schema):
    """A user as it shows itself (never its password or hash)."""

    username = fields.String(required=True)
    admin = fields.Boolean(required=True)
    rpm = fields.Integer(allow_none=True, metadata={"description": "its own requests/minute"})
    tpm = fields.Integer(allow_none=True, metadata={"description": "its own tokens/minute"})
    created_at = fields.DateTime(required=True)
    last_login_at = fields.DateTime(allow_none=True)


class MeSchema(Schema):
    """Who the credential sent is: a user, or an API key."""

    kind = fields.String(required=True, validate=validate.OneOf(["user", "key"]))
    name = fields.String(required=True)
    admin = fields.Boolean(required=True)
    models = fields.List(fields.String(), allow_none=True)
    rpm = fields.Integer(allow_none=True)
    tpm = fields.Integer(allow_none=True)
    user = fields.Nested(AccountSchema, allow_none=True)


def guard() -> Guard:
    found: Guard = current_app.extensions["textgen.guard"]
    return found


def account_body(account: Account) -> dict[str, Any]:
    return {
        "username": account.username,
        "admin": account.admin,
        "rpm": account.rpm,
        "tpm": account.tpm,
        "created_at": account.created_at,
        "last_login_at": account.last_login_at,
    }


@bp.post("/token")
@bp.arguments(TokenFormSchema, location="form", example={"grant_type": "password"})
@bp.response(200, TokenSchema)
@bp.errors(400, 401, 415, 429)
def issue_token(form: dict[str, Any]) -> dict[str, Any]:
    """Log in: `grant_type=password&username=...&password=...` as a form gives an access
    token to send as `Authorization: Bearer`."""
    if form["grant_type"] != "password":
        raise InvalidRequest(
            "only grant_type=password is supported", "grant_type", "unsupported_grant_type"
        )
    found = guard()
    assert found.users is not None and found.signer is not None
    user = found.users.authenticate(form["username"], form["password"])
    if user is None:
        raise Unauthorized(
            "wrong username or password", code="invalid_credentials", headers=CHALLENGE
        )
    issued = found.signer.issue(user.name)
    return {"access_token": issued.token, "token_type": "bearer", "expires_in": issued.expires_in}


@bp.post("/register")
@bp.arguments(RegisterSchema, example={"username": "ada", "password": "a long passphrase"})
@bp.response(201, AccountSchema)
@bp.errors(400, 404, 409, 415)
def register(body: dict[str, Any]) -> dict[str, Any]:
    """Make an account (404 unless TEXTGEN_REGISTRATION is on); then log in at /token."""
    if not current_app.extensions["textgen.settings"].registration:
        raise NotFound("registration is off on this server", code="registration_disabled")
    users = guard().users
    assert users is not None
    try:
        return account_body(users.create(body["username"], body["password"]))
    except WeakPassword as exc:
        raise InvalidRequest(str(exc), "password", "weak_password") from None
    except UserError as exc:
        taken = "taken" in str(exc)
        if taken:
            raise Conflict(str(exc), "username", "username_taken") from None
        raise InvalidRequest(str(exc), "username", "invalid_username") from None


@bp.get("/users/me")
@bp.response(200, MeSchema)
@bp.errors(401)
def me() -> dict[str, Any]:
    """Who the credential sent is, and its limits."""
    who = principal()
    assert who is not None  # the guard let it through
    body: dict[str, Any] = {
        "kind": who.kind,
        "name": who.name,
        "admin": who.admin,
        "models": list(who.models) if who.models is not None else None,
        "rpm": who.rpm,
        "tpm": who.tpm,
        "user": None,
    }
    users = guard().users
    if who.kind == "user" and users is not None:
        account = users.account(who.name)
        body["user"] = account_body(account) if account else None
    return body
