"""Users and access tokens over HTTP (TEXTGEN_AUTH=jwt), on SQLite and on a real PostgreSQL:
no default credentials, the OAuth2 password form, JWTs that cannot be forged or bent, and
only argon2id hashes stored."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from sqlalchemy import create_engine, text

from tests import services
from tests.conftest import served, tiny_config
from tests.leaks import remember_password

SECRET = "a-test-secret-that-is-40-bytes-long-xyz"
assert len(SECRET.encode()) >= 32
PASSWORD = remember_password("correct horse battery staple")


@dataclass
class Server:
    url: str
    database: str

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "TEXTGEN_DATABASE_URL": self.database}
        return subprocess.run(
            [sys.executable, "-m", "textgen", *args],
            env=env, input=stdin, capture_output=True, text=True, check=False,
        )  # fmt: skip

    def login(self, username: str, password: str) -> requests.Response:
        form = {"grant_type": "password", "username": username, "password": password}
        return requests.post(f"{self.url}/token", data=form, timeout=30)

    def token(self, username: str = "ada", password: str = PASSWORD) -> str:
        response = self.login(username, password)
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'textgen.db'}"
    else:
        with services.postgres() as url:
            yield url


@pytest.fixture(scope="module")
def server(
    database: str, model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    config = tiny_config(
        model_dirs, tmp_path_factory.mktemp("cache"), AUTH="jwt", JWT_SECRET=SECRET,
        DATABASE_URL=database, JWT_TTL=600, LOGIN_RPM=1000,
    )  # fmt: skip
    with served(config) as url:
        made = Server(url, database)
        result = made.cli("users", "create", "ada", "--admin", "--password-stdin", stdin=PASSWORD)
        assert result.returncode == 0, result.stderr
        yield made


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def generate(server: Server, token: str | None) -> requests.Response:
    headers = bearer(token) if token is not None else {}
    body = {"prompt": "Hi", "max_new_tokens": 2}
    return requests.post(f"{server.url}/generate", json=body, headers=headers, timeout=60)


def test_no_default_credentials(server: Server) -> None:
    # The seed projects' pairs: unknown users here, and refused as passwords for new ones.
    for username, password in (("admin", "admin"), ("agam", "StrongPass123!")):
        response = server.login(username, password)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_credentials"
        made = server.cli("users", "create", username, "--password-stdin", stdin=password)
        assert made.returncode != 0 and "password" in made.stderr
        assert server.login(username, password).status_code == 401


def test_log_in_and_generate(server: Server) -> None:
    login = server.login("ada", PASSWORD)
    assert login.status_code == 200
    body = login.json()
    assert body["token_type"] == "bearer" and body["expires_in"] == 600
    token = body["access_token"]
    assert generate(server, token).status_code == 200
    me = requests.get(f"{server.url}/users/me", headers=bearer(token), timeout=30).json()
    assert (me["kind"], me["name"], me["admin"]) == ("user", "ada", True)
    assert me["user"]["last_login_at"] is not None
    assert generate(server, None).status_code == 401
    assert server.login("ada", PASSWORD + "!").status_code == 401


def claims(**changes: Any) -> dict[str, Any]:
    moment = dt.datetime.now(dt.UTC)
    base = {"sub": "ada", "iss": "textgen", "iat": moment, "exp": moment + dt.timedelta(minutes=5)}
    return {k: v for k, v in (base | changes).items() if v is not None}


def segment(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_forged_and_bent_tokens_are_refused(server: Server) -> None:
    good = server.token()
    header, payload, signature = good.split(".")
    as_admin = json.loads(base64.urlsafe_b64decode(payload + "=="))
    as_admin["sub"] = "someone-else"
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    forged = {
        "alg none": f"{segment({'alg': 'none', 'typ': 'JWT'})}.{payload}.",
        "HS512": jwt.encode(claims(), SECRET * 2, algorithm="HS512"),
        "expired": jwt.encode(claims(iat=past, exp=past), SECRET, algorithm="HS256"),
        "wrong secret": jwt.encode(claims(), "w" * 40, algorithm="HS256"),
        "no exp": jwt.encode(claims(exp=None), SECRET, algorithm="HS256"),
        "tampered": f"{header}.{segment(as_admin)}.{signature}",
        "not a jwt": "abc.def.ghi",
        "other issuer": jwt.encode(claims(iss="elsewhere"), SECRET, algorithm="HS256"),
    }
    for name, token in forged.items():
        response = generate(server, token)
        assert response.status_code == 401, name
        assert response.json()["error"]["code"] == "invalid_token", name
    assert "expired" in generate(server, forged["expired"]).json()["error"]["message"]
    # Signed right, for a user who does not exist: refused too.
    ghost = jwt.encode(claims(sub="ghost"), SECRET, algorithm="HS256")
    assert generate(server, ghost).status_code == 401
    assert generate(server, good).status_code == 200


def test_a_disabled_users_token_stops_working(server: Server) -> None:
    made = server.cli("users", "create", "brief", "--password-stdin", stdin=PASSWORD + " two")
    assert made.returncode == 0, made.stderr
    token = server.token("brief", PASSWORD + " two")
    assert generate(server, token).status_code == 200
    assert server.cli("users", "disable", "brief").returncode == 0
    assert generate(server, token).status_code == 401
    assert server.login("brief", PASSWORD + " two").status_code == 401


def test_registration_is_off_by_default(server: Server) -> None:
    response = requests.post(
        f"{server.url}/register", json={"username": "eve", "password": PASSWORD}, timeout=30
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "registration_disabled"


def test_token_wants_the_oauth2_form(server: Server) -> None:
    as_json = requests.post(
        f"{server.url}/token", json={"username": "ada", "password": PASSWORD}, timeout=30
    )
    assert as_json.status_code == 415
    other_grant = requests.post(
        f"{server.url}/token",
        data={"grant_type": "client_credentials", "username": "ada", "password": PASSWORD},
        timeout=30,
    )
    assert other_grant.status_code == 400
    assert other_grant.json()["error"]["param"] == "grant_type"
    missing = requests.post(f"{server.url}/token", data={"username": "ada"}, timeout=30)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "password"


def test_only_argon2id_hashes_are_stored(server: Server) -> None:
    engine = create_engine(server.database)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT username, password_hash FROM users")).all()
    engine.dispose()
    assert rows
    for username, stored in rows:
        assert stored.startswith("$argon2id$"), username
    dumped = " ".join(str(value) for row in rows for value in row)
    assert PASSWORD not in dumped


def test_keys_work_beside_tokens(server: Server) -> None:
    made = server.cli("keys", "create", "robot")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert generate(server, key).status_code == 200
    me = requests.get(f"{server.url}/users/me", headers=bearer(key), timeout=30).json()
    assert (me["kind"], me["name"], me["user"]) == ("key", "robot", None)


def test_info_shows_the_anonymous_only_the_version(server: Server) -> None:
    anonymous = requests.get(f"{server.url}/info", timeout=30)
    assert anonymous.status_code == 200
    assert set(anonymous.json()) == {"version"}
    full = requests.get(f"{server.url}/info", headers=bearer(server.token()), timeout=30).json()
    assert full["settings"]["auth"] == "jwt"
    assert full["settings"]["jwt_secret"] == "***"
    assert SECRET not in json.dumps(full)
    bad = requests.get(f"{server.url}/info", headers=bearer("nope"), timeout=30)
    assert bad.status_code == 401


@pytest.fixture(scope="module")
def open_server(
    model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("register")
    database = f"sqlite:///{root / 'textgen.db'}"
    config = tiny_config(
        model_dirs, root / "cache", AUTH="jwt", JWT_SECRET=SECRET, DATABASE_URL=database,
        REGISTRATION=True, LOGIN_RPM=10,
    )  # fmt: skip
    with served(config) as url:
        yield Server(url, database)


def test_registration_when_enabled(open_server: Server) -> None:
    def register(username: str, password: str) -> requests.Response:
        body = {"username": username, "password": password}
        return requests.post(f"{open_server.url}/register", json=body, timeout=30)

    made = register("grace", PASSWORD)
    assert made.status_code == 201, made.text
    assert made.json()["username"] == "grace" and made.json()["admin"] is False
    assert register("grace", PASSWORD).status_code == 409
    for weak in ("admin", "StrongPass123!", "short", "my-name-is-hopper"):
        response = register("hopper", weak)
        assert response.status_code == 400, weak
        assert response.json()["error"]["code"] == "weak_password"
    assert register("../etc", PASSWORD).json()["error"]["param"] == "username"


def test_password_guessing_is_rate_limited(open_server: Server) -> None:
    answers = [open_server.login("nobody", f"guess number {i}").status_code for i in range(12)]
    assert answers == [401] * 10 + [429] * 2
    refused = open_server.login("nobody", "guess")
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert int(refused.headers["Retry-After"]) > 0
