"""The OpenAPI document, /docs and /redoc: complete, valid, and rendered offline in Chromium."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from openapi_spec_validator import validate

from tests.conftest import REPO, chromium_path, local_only

ARTIFACTS = Path(os.environ.get("TEXTGEN_TEST_ARTIFACTS", REPO / ".artifacts"))
METHODS = {"get", "post", "put", "patch", "delete"}


def document(client: FlaskClient) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.get_json()


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in METHODS
    ]


def test_the_document_is_valid_openapi(client: FlaskClient) -> None:
    doc = document(client)
    assert doc["openapi"].startswith("3.1")
    validate(doc)


def test_every_route_is_documented(app: Flask, client: FlaskClient) -> None:
    doc = document(client)
    documented = {(method, path) for method, path, _ in operations(doc)}
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.endpoint.startswith(("api-docs.", "playground.")):
            continue  # pages, not API operations
        path = rule.rule.replace("<path:", "{").replace("<", "{").replace(">", "}")
        served |= {
            (method.lower(), path) for method in rule.methods or () if method.lower() in METHODS
        }
    assert served == documented
    assert len(documented) >= 11


def test_every_operation_has_a_summary_errors_and_examples(client: FlaskClient) -> None:
    for method, path, op in operations(document(client)):
        assert op.get("summary"), (method, path)
        responses = op["responses"]
        assert "200" in responses, (method, path)
        error = responses["default"]  # any status textgen answers with has the error shape
        assert "Error" in str(error) or "DEFAULT_ERROR" in str(error)
        if method == "post":
            body = op["requestBody"]["content"]["application/json"]
            assert body.get("example"), path
            assert {"400", "404", "413", "503"} <= set(responses), path


def test_streams_are_documented_as_event_streams(client: FlaskClient) -> None:
    doc = document(client)
    for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
        content = doc["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}
        assert "[DONE]" in content["text/event-stream"]["example"]


@pytest.mark.slow
def test_the_examples_run_against_the_embedded_model(embedded_client: FlaskClient) -> None:
    # The documented examples are real requests: each is answered with 200 and its schema's
    # required fields.
    client = embedded_client
    doc = document(client)
    schemas = doc["components"]["schemas"]
    for method, path, op in operations(doc):
        if method != "post":
            continue
        example = op["requestBody"]["content"]["application/json"]["example"]
        response = client.post(path, json=example)
        assert response.status_code == 200, (path, response.get_json())
        ref = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        required = schemas[ref.rsplit("/", 1)[-1]].get("required", [])
        assert set(required) <= set(response.get_json()), path


def test_docs_pages_load_their_assets_from_textgen(client: FlaskClient) -> None:
    for page, assets in {
        "/docs": ["swagger-ui-bundle.js", "swagger-ui-standalone-preset.js", "swagger-ui.css"],
        "/redoc": ["redoc.standalone.js"],
    }.items():
        html = client.get(page).get_data(as_text=True)
        links = re.findall(r'(?:src|href)="([^"]*)"', html)
        assert links and all(link.startswith("/static/vendor/") for link in links), links
        for asset in assets:
            assert any(link.endswith(asset) for link in links), asset
            folder = "swagger-ui" if "swagger" in asset else "redoc"
            served = client.get(f"/static/vendor/{folder}/{asset}")
            assert served.status_code == 200 and len(served.data) > 10_000
            served.close()


def test_docs_render_every_operation_in_chromium_offline(live: str, client: FlaskClient) -> None:
    from playwright.sync_api import sync_playwright

    count = len(operations(document(client)))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path())
        try:
            page = browser.new_page()
            # A request the page's Content-Security-Policy blocks never reaches this check.
            hosts = local_only(page)
            page.goto(f"{live}/docs")
            page.wait_for_selector(".opblock", timeout=60_000)
            assert page.locator(".opblock").count() == count
            page.screenshot(path=str(ARTIFACTS / "docs.png"), full_page=True)
            page.goto(f"{live}/redoc")
            operations_shown = page.locator('[data-section-id^="tag/"][data-section-id*="/paths/"]')
            operations_shown.first.wait_for(timeout=60_000)
            assert operations_shown.count() == count
            page.screenshot(path=str(ARTIFACTS / "redoc.png"))
        finally:
            browser.close()
    assert hosts == {"127.0.0.1"}
