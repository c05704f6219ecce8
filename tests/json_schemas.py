"""JSON Schemas covering the features callers use: the property tests' cases and the grammar libraries'
comparison (scripts/compare_grammar_libs.py). Each: (name, schema, a prompt that asks for it)."""

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 130}},
    "required": ["name", "age"],
    "additionalProperties": False,
}

SCHEMAS = [
    ("object, required", PERSON, "Describe a person as JSON with a name and an age."),
    ("optional fields", {
        "type": "object",
        "properties": {"title": {"type": "string", "maxLength": 60}, "year": {"type": "integer"},
                       "genre": {"type": "string", "maxLength": 20}},
        "required": ["title"], "additionalProperties": False,
    }, "Give a film as JSON: title, and optionally year and genre."),
    ("enum", {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "sure": {"type": "boolean"}},
        "required": ["color", "sure"], "additionalProperties": False,
    }, "What color is the sky? Answer as JSON."),
    ("array of strings, bounded", {
        "type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 2, "maxItems": 4,
    }, "List a few fruits as a JSON array."),
    ("nested", {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "location": {"type": "object",
                         "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                        "lon": {"type": "number", "minimum": -180, "maximum": 180}},
                         "required": ["lat", "lon"], "additionalProperties": False},
        },
        "required": ["city", "location"], "additionalProperties": False,
    }, "Where is Paris? JSON with the city and its location."),
    ("numbers with bounds", {
        "type": "object",
        "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1},
                       "count": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["score", "count"], "additionalProperties": False,
    }, "Rate this sentence as JSON with a score and a count."),
    ("string pattern", {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
        "required": ["code"], "additionalProperties": False,
    }, "Make up a product code as JSON."),
    ("array of objects", {
        "type": "array", "maxItems": 3,
        "items": {"type": "object", "properties": {"id": {"type": "integer"}, "done": {"type": "boolean"}},
                  "required": ["id", "done"], "additionalProperties": False},
    }, "List up to three tasks as JSON objects with an id and whether each is done."),
    ("anyOf", {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 10}, {"type": "null"}]}},
        "required": ["value"], "additionalProperties": False,
    }, "Give a value as JSON."),
    ("$defs and $ref", {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                            "required": ["x", "y"], "additionalProperties": False}},
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"], "additionalProperties": False,
    }, "A line segment as JSON with start and end points."),
    ("const and string lengths", {
        "type": "object",
        "properties": {"kind": {"const": "greeting"}, "text": {"type": "string", "minLength": 2, "maxLength": 12}},
        "required": ["kind", "text"], "additionalProperties": False,
    }, "Say hello as JSON."),
    ("free-form object", {"type": "object"}, "Describe the weather as a JSON object."),
]

# Schemas whose documents have no length bound (an integer without bounds, a free-form object): a small
# model at greedy may repeat a digit until max_tokens, which `truncated` then says.
UNBOUNDED = {"array of objects", "anyOf", "$defs and $ref", "free-form object"}

# Features some libraries do not enforce; the comparison records which.
HARDER = [
    ("formats", {
        "type": "object",
        "properties": {"when": {"type": "string", "format": "date"}, "mail": {"type": "string", "format": "email"}},
        "required": ["when", "mail"], "additionalProperties": False,
    }, "Give a date and an email address as JSON."),
    ("exclusive bounds, oneOf", {
        "type": "object",
        "properties": {"p": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                       "tag": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]}},
        "required": ["p", "tag"], "additionalProperties": False,
    }, "Give a probability and a tag as JSON."),
    ("additionalProperties schema", {
        "type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 3,
    }, "Count some animals as a JSON object of names to integers."),
]
