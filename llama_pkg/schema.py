"""The OpenAPI schema for .cog/openapi_schema.json, made from predict.py by the Cog SDK's own introspection
(cog._inspector): without it Cog's server (coglet) validates nothing, serves no /openapi.json and refuses
SSE. coglet validates each input as JSON Schema, which knows no OpenAPI 3.0 `nullable`: so this is OpenAPI
3.1 and an optional input's type says "null" too; what the schema allows the predictor takes, what it
refuses is a 422 (tests/test_http.py). coglet ignores `if`/`then`, so "a prompt or messages" stays the
predictor's rule.
"""

import json
from pathlib import Path

SCHEMA_PATH = Path(".cog") / "openapi_schema.json"  # in the project's folder, the working directory


def _input_property(field):
    from cog._adt import PrimitiveType, Repetition

    prop = {"title": field.name.replace("_", " ").title(), "x-order": field.order, **field.type.json_type()}
    if field.deprecated:
        prop["deprecated"] = True
    if field.description:
        prop["description"] = field.description
    if field.default is not None:
        prop["default"] = field.type.json_encode(field.default)
    as_number = int if field.type.primitive is PrimitiveType.INTEGER else float
    for key, value in (("minLength", field.min_length), ("maxLength", field.max_length), ("pattern", field.regex),
                       ("enum", field.choices)):
        if value is not None:
            prop[key] = value
    if field.ge is not None:
        prop["minimum"] = as_number(field.ge)
    if field.le is not None:
        prop["maximum"] = as_number(field.le)
    if field.type.repetition is Repetition.OPTIONAL:
        prop["type"] = [prop["type"], "null"]  # null: not given (minimum and maximum bound numbers only)
    return prop


def _is_required(field):
    from cog._adt import Repetition

    return field.default is None and field.type.repetition is Repetition.REQUIRED


def openapi_schema(module="predict", predictor="Predictor"):
    from cog._adt import OutputKind
    from cog._inspector import create_predictor

    info = create_predictor(module, predictor)
    fields = sorted(info.inputs.values(), key=lambda f: f.order)
    streaming = info.output.kind in (OutputKind.ITERATOR, OutputKind.CONCAT_ITERATOR)
    ref = lambda name: {"$ref": f"#/components/schemas/{name}"}  # noqa: E731
    json_body = lambda name: {"application/json": {"schema": ref(name)}}  # noqa: E731
    return {
        "openapi": "3.1.0",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {
            "/predictions": {"post": {
                "summary": "Predict", "operationId": "predict_predictions_post", "x-cog-streaming": streaming,
                "requestBody": {"content": json_body("PredictionRequest")},
                "responses": {"200": {"description": "Successful Response", "content": json_body("PredictionResponse")},
                              "422": {"description": "Validation Error", "content": json_body("HTTPValidationError")}},
            }},
        },
        "components": {"schemas": {
            "Input": {"type": "object", "title": "Input", "properties": {f.name: _input_property(f) for f in fields},
                      "required": [f.name for f in fields if _is_required(f)]},
            "Output": info.output.json_type(),
            "Status": {"title": "Status", "type": "string",
                       "enum": ["starting", "processing", "succeeded", "canceled", "failed"]},
            "PredictionRequest": {"title": "PredictionRequest", "type": "object", "properties": {
                "id": {"title": "Id", "type": "string"}, "input": ref("Input"),
                "webhook": {"title": "Webhook", "type": "string", "format": "uri"},
                "webhook_events_filter": {"type": "array", "items": {"type": "string"}}}},
            "PredictionResponse": {"title": "PredictionResponse", "type": "object", "properties": {
                "id": {"title": "Id", "type": "string"}, "input": ref("Input"), "output": ref("Output"),
                "status": ref("Status"), "error": {"title": "Error", "type": "string"},
                "logs": {"title": "Logs", "type": "string", "default": ""},
                "metrics": {"title": "Metrics", "type": "object"}}},
            "ValidationError": {"title": "ValidationError", "type": "object", "properties": {
                "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                "msg": {"type": "string"}, "type": {"type": "string"}}},
            "HTTPValidationError": {"title": "HTTPValidationError", "type": "object", "properties": {
                "detail": {"type": "array", "items": ref("ValidationError")}}},
        }},
    }


def write(path=SCHEMA_PATH):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(openapi_schema(), indent=2) + "\n")
    return path
