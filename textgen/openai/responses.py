"""Response schemas of the OpenAI-compatible API, for the OpenAPI document."""

from __future__ import annotations

from marshmallow import Schema, fields

from textgen.api.responses import UsageSchema

FINISH_REASONS = ["stop", "length", "time_limit"]


class CompletionLogprobsSchema(Schema):
    tokens = fields.List(fields.String(), required=True)
    token_logprobs = fields.List(fields.Float(allow_none=True), required=True)
    top_logprobs = fields.List(
        fields.Dict(keys=fields.String(), values=fields.Float(), allow_none=True), required=True
    )
    text_offset = fields.List(fields.Integer(), required=True)


class CompletionChoiceSchema(Schema):
    index = fields.Integer(required=True)
    text = fields.String(required=True)
    logprobs = fields.Nested(CompletionLogprobsSchema, allow_none=True, required=True)
    finish_reason = fields.String(required=True, metadata={"enum": FINISH_REASONS})


class GeneratedSchema(Schema):
    """What every OpenAI generation response carries, in OpenAI's order (subclasses name the
    object and shape the choices; a redeclared field keeps its place)."""

    id = fields.String(required=True)
    object = fields.String(required=True)
    created = fields.Integer(required=True)
    model = fields.String(required=True)
    system_fingerprint = fields.String(
        required=True, metadata={"description": "model, revision, weight format and version"}
    )
    choices = fields.List(fields.Dict(), required=True)
    usage = fields.Nested(UsageSchema, required=True)


class CompletionResponseSchema(GeneratedSchema):
    """A text completion (streamed chunks have the same shape, one choice each)."""

    object = fields.String(required=True, metadata={"enum": ["text_completion"]})
    choices = fields.List(fields.Nested(CompletionChoiceSchema), required=True)


class TopLogprobSchema(Schema):
    token = fields.String(required=True)
    logprob = fields.Float(required=True)
    bytes = fields.List(fields.Integer(), required=True)


class TokenLogprobSchema(TopLogprobSchema):
    top_logprobs = fields.List(fields.Nested(TopLogprobSchema), required=True)


class ChatLogprobsSchema(Schema):
    content = fields.List(fields.Nested(TokenLogprobSchema), required=True)


class CalledFunctionOutSchema(Schema):
    name = fields.String(required=True)
    arguments = fields.String(required=True, metadata={"description": "a JSON object, as text"})


class ToolCallOutSchema(Schema):
    id = fields.String(required=True)
    type = fields.String(required=True, metadata={"enum": ["function"]})
    function = fields.Nested(CalledFunctionOutSchema, required=True)


class ChatMessageOutSchema(Schema):
    role = fields.String(required=True, metadata={"enum": ["assistant"]})
    content = fields.String(
        required=True, allow_none=True, metadata={"description": "null for a call"}
    )
    tool_calls = fields.List(fields.Nested(ToolCallOutSchema))


class ChatChoiceSchema(Schema):
    index = fields.Integer(required=True)
    message = fields.Nested(ChatMessageOutSchema, required=True)
    logprobs = fields.Nested(ChatLogprobsSchema, allow_none=True, required=True)
    finish_reason = fields.String(required=True, metadata={"enum": [*FINISH_REASONS, "tool_calls"]})


class ChatCompletionResponseSchema(GeneratedSchema):
    """A chat completion."""

    object = fields.String(required=True, metadata={"enum": ["chat.completion"]})
    choices = fields.List(fields.Nested(ChatChoiceSchema), required=True)


class OpenAIModelSchema(Schema):
    """A model in OpenAI's shape, with textgen's facts alongside."""

    id = fields.String(required=True)
    object = fields.String(required=True, metadata={"enum": ["model"]})
    created = fields.Integer(required=True)
    owned_by = fields.String(required=True)
    max_model_len = fields.Integer(allow_none=True, required=True)
    status = fields.String(required=True)


class OpenAIModelListSchema(Schema):
    object = fields.String(required=True, metadata={"enum": ["list"]})
    data = fields.List(fields.Nested(OpenAIModelSchema), required=True)


COMPLETION_EVENTS = """Server-sent events (`"stream": true`), each `data: <JSON>`: chunks shaped
like the whole response with one choice each (`text` a piece of the completion;
`finish_reason` set in the choice's last chunk); with `stream_options.include_usage`, a
last chunk with `"choices": []` and `usage`; then `data: [DONE]`. An error after the start is
`data: {"error": {...}}`, then `data: [DONE]`."""

CHAT_EVENTS = """Server-sent events (`"stream": true`), each `data: <JSON>` with `"object":
"chat.completion.chunk"`: first `{"delta": {"role": "assistant", "content": ""}}` per choice,
then `{"delta": {"content": ...}}` pieces (or, for a call, `{"delta": {"tool_calls": [{"index",
"id", "type", "function": {"name", "arguments": ""}}]}}` and then the arguments in pieces), then
`{"delta": {}, "finish_reason": ...}`; with
`stream_options.include_usage`, a last chunk with `"choices": []` and `usage`; then
`data: [DONE]`. An error after the start is `data: {"error": {...}}`, then `data: [DONE]`."""


class ResponseUsageSchema(Schema):
    input_tokens = fields.Integer(required=True)
    input_tokens_details = fields.Dict(required=True, metadata={"description": "cached_tokens"})
    output_tokens = fields.Integer(required=True)
    output_tokens_details = fields.Dict(required=True, metadata={"description": "reasoning"})
    total_tokens = fields.Integer(required=True)


class ResponseObjectSchema(Schema):
    """A Responses API response: its output items (a message with output_text parts, or a
    function_call), status, usage, and the settings it was made with."""

    id = fields.String(required=True)
    object = fields.String(required=True, metadata={"enum": ["response"]})
    created_at = fields.Integer(required=True)
    status = fields.String(required=True, metadata={"enum": ["completed", "incomplete"]})
    model = fields.String(required=True)
    output = fields.List(fields.Dict(), required=True)
    usage = fields.Nested(ResponseUsageSchema, required=True)
    incomplete_details = fields.Dict(allow_none=True, required=True)
    error = fields.Dict(allow_none=True, required=True)
    instructions = fields.String(allow_none=True, required=True)
    max_output_tokens = fields.Integer(allow_none=True, required=True)
    temperature = fields.Float(required=True)
    top_p = fields.Float(required=True)
    tool_choice = fields.Raw(required=True)
    tools = fields.List(fields.Dict(), required=True)
    text = fields.Dict(required=True)
    parallel_tool_calls = fields.Boolean(required=True)
    metadata_ = fields.Dict(data_key="metadata", attribute="metadata", required=True)


RESPONSE_EVENTS = """Typed server-sent events (`event: <type>` then `data: <JSON>` with `type` and
`sequence_number`): `response.created`, `response.in_progress`, `response.output_item.added`,
`response.content_part.added`, `response.output_text.delta` (the text in pieces),
`response.output_text.done`, `response.content_part.done`, `response.output_item.done`, then
`response.completed` (or `response.incomplete`) with the whole response; a call comes as
`response.function_call_arguments.delta` and `.done` instead of the text events. An error after
the start is an `error` event."""
