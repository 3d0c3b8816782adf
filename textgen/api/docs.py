"""Routes that declare their schemas, and the OpenAPI document, /docs and /redoc built from them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib.metadata import version
from typing import Any, NoReturn

import flask_smorest
from flask import Flask, Request, Response, request
from marshmallow import Schema, ValidationError
from webargs.flaskparser import FlaskParser

from textgen.api.body import BodyError, parse_object
from textgen.api.errors import InvalidRequest, UnsupportedMediaType
from textgen.api.responses import ErrorSchema

# What each error status means on textgen's routes (the shape is always ErrorSchema).
ERRORS = {
    400: "invalid body or field (`param` names it), or the prompt is too long for the model",
    401: "no credentials, or ones that are not valid (`WWW-Authenticate`)",
    403: "the key may not use that model",
    404: "no such model",
    409: "the name is taken",
    413: "the body is larger than TEXTGEN_MAX_BODY_BYTES",
    415: "the body is not sent as Content-Type: application/json (a form, for /token)",
    429: "the engine is full, or a rate limit is reached (`Retry-After` says when to retry)",
    500: "the generation failed",
    503: "the models are still loading (`Retry-After`)",
}
GENERATES = (400, 404, 413, 415, 429, 500, 503)
READS_MODEL = (400, 404, 413, 415, 503)

VENDOR = "/static/vendor/"
# The docs pages may load only what textgen serves: ReDoc's footer would fetch its logo from
# cdn.redoc.ly (an image the browser now does not ask for). Swagger UI's page starts it from an
# inline script, and ReDoc runs its search in a worker made from a blob.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'"
)


class BodyParser(FlaskParser):
    """Bodies as textgen reads them: JSON only (415 for any other Content-Type), checked for
    depth and lone surrogates, and every problem a 400 in textgen's error shape."""

    DEFAULT_VALIDATION_STATUS = 400

    def load_json(self, req: Request, schema: Schema) -> Any:
        # Only JSON: a web page can send a text/plain or form POST to a local server without a
        # CORS preflight, so any other type would let every site the user visits generate.
        if not req.is_json:
            raise UnsupportedMediaType(
                f"the body must be JSON with Content-Type: application/json, not "
                f"{req.mimetype or 'none'!r}",
                code="unsupported_media_type",
            )
        # get_data enforces the body limit (a 413), chunked bodies included.
        try:
            return parse_object(req.get_data(cache=True))
        except BodyError as exc:
            raise InvalidRequest(str(exc), exc.param, code="invalid_json") from None

    def load_form(self, req: Request, schema: Schema) -> Any:
        # OAuth2's password grant is a form, and only a form.
        if req.mimetype not in ("application/x-www-form-urlencoded", "multipart/form-data"):
            raise UnsupportedMediaType(
                f"the body must be a form (application/x-www-form-urlencoded), not "
                f"{req.mimetype or 'none'!r}",
                code="unsupported_media_type",
            )
        return super().load_form(req, schema)

    def handle_error(
        self,
        error: ValidationError,
        req: Request,
        schema: Schema,
        *,
        error_status_code: int | None,
        error_headers: Mapping[str, str] | None,
    ) -> NoReturn:
        # webargs files the messages under the location ("json"); params name body fields.
        messages = error.messages
        if isinstance(messages, dict) and len(messages) == 1 and set(messages) <= {"json", "form"}:
            messages = next(iter(messages.values()))
        raise ValidationError(messages)  # textgen's handler names every bad field


class Blueprint(flask_smorest.Blueprint):
    """A flask-smorest blueprint whose bodies go through BodyParser."""

    ARGUMENTS_PARSER = BodyParser()

    def errors(self, *statuses: int) -> Callable[[Any], Any]:
        """Document a route's error responses."""

        def decorate(view: Any) -> Any:
            for status in statuses:
                view = self.alt_response(status, schema=ErrorSchema, description=ERRORS[status])(
                    view
                )
            return view

        return decorate

    def generates(self, view: Any) -> Any:
        """Mark a route that generates (a full engine queue refuses it before a thread takes
        it: see ``generation_paths``) and document its errors."""
        view.generates = True
        return self.errors(*GENERATES)(view)

    def streams(self, events: str, example: str) -> Callable[[Any], Any]:
        """Document the text/event-stream form of a 200 (``"stream": true``)."""
        content = {"text/event-stream": {"schema": {"type": "string"}, "example": example}}
        description = 'The JSON response; with `"stream": true`, ' + events[0].lower() + events[1:]
        return self.doc(responses={200: {"description": description, "content": content}})


def generation_paths(app: Flask) -> frozenset[str]:
    """The paths of the routes marked ``generates``."""
    return frozenset(
        rule.rule
        for rule in app.url_map.iter_rules()
        if getattr(app.view_functions[rule.endpoint], "generates", False)
    )


class Api(flask_smorest.Api):
    """The OpenAPI document of every route, with textgen's error shape."""

    ERROR_SCHEMA = ErrorSchema


def init_docs(app: Flask) -> Api:
    """Serve /openapi.json, Swagger UI at /docs and ReDoc at /redoc; their scripts and styles
    come from textgen's own static files, so the docs work offline."""
    app.config.update(
        API_TITLE="textgen",
        API_VERSION=version("textgen"),
        OPENAPI_VERSION="3.1.0",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="docs",
        OPENAPI_SWAGGER_UI_URL=VENDOR + "swagger-ui/",
        # Swagger UI would otherwise send the document to validator.swagger.io.
        OPENAPI_SWAGGER_UI_CONFIG={"validatorUrl": None, "tryItOutEnabled": True},
        OPENAPI_REDOC_PATH="redoc",
        OPENAPI_REDOC_URL=VENDOR + "redoc/redoc.standalone.js",
        API_SPEC_OPTIONS={
            "info": {
                "description": "Text generation on CPUs: a native API (`/generate`) and an "
                'OpenAI-compatible one (`/v1`). Every error is `{"error": {"message", '
                '"type", "param", "code"}}`.'
            },
        },
    )
    api = Api(app)

    @app.after_request
    def docs_stay_local(response: Response) -> Response:
        if request.endpoint in ("api-docs.openapi_swagger_ui", "api-docs.openapi_redoc"):
            response.headers["Content-Security-Policy"] = DOCS_CSP
        return response

    return api
