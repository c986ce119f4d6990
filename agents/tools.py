"""Tools a model step may offer its model: Python functions with a JSON schema.

A tool is a function the model may ask to call during a step (`Step(tools=...)`). Its
schema, what the model is told the arguments are, is derived from the signature's type
hints (str, int, float, bool, lists of them, `Optional[...]`, `Literal[...]`) and its
docstring's first line is the description; or both are given explicitly.

    def weather(city: str, unit: Literal["c", "f"] = "c") -> str:
        "Today's weather in a city."
        ...

    Step(backend="openai", tools=(weather,))            # derived
    Step(backend="openai", tools=(Tool.of(weather, soft_limit_s=2.0),))

A parameter annotated `StepContext` is not offered to the model: the step passes its
context (tenant, stream, run), so a tool can scope what it reads to the tenant.

Everything is bounded: tools per step, schema size, the arguments a model may send (they
are validated against the schema before the function sees them), the result's length
(cut with a marker) and the time a call may take (`soft_limit_s`). Pure: no I/O.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union

# OpenAI's rule for function names, which Anthropic's accepts too.
TOOL_NAME = re.compile(r"\A[A-Za-z0-9_-]{1,64}\Z")
MAX_TOOLS_PER_STEP = 32
MAX_SCHEMA_BYTES = 16_384  # one tool's schema, as JSON
MAX_DESCRIPTION_CHARS = 1024
MAX_ARGUMENT_BYTES = 16_384  # the arguments of one call, as the model sent them
MAX_RESULT_CHARS = 64_000  # the most a tool's max_result_chars may be
DEFAULT_RESULT_CHARS = 8_000
DEFAULT_TOOL_SOFT_LIMIT_S = 10.0
MAX_TOOL_ROUNDS = 16
DEFAULT_TOOL_ROUNDS = 4
# How deep a schema (or arguments checked against it) may nest.
MAX_SCHEMA_DEPTH = 8


class BadTool(ValueError):
    """A tool definition that cannot be offered as written (raised when the step is made)."""


class BadArguments(ValueError):
    """A model's arguments for a call that do not fit the tool's schema."""


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    function: Callable[..., Any]
    description: str = ""
    # JSON schema of the arguments object.
    parameters: Mapping[str, Any] = field(default_factory=dict)
    soft_limit_s: float = DEFAULT_TOOL_SOFT_LIMIT_S
    max_result_chars: int = DEFAULT_RESULT_CHARS
    # The name of the parameter that receives the StepContext, if any.
    context_parameter: str = ""

    @classmethod
    def of(
        cls,
        function: Callable[..., Any],
        *,
        name: str = "",
        description: str = "",
        parameters: Mapping[str, Any] | None = None,
        soft_limit_s: float = DEFAULT_TOOL_SOFT_LIMIT_S,
        max_result_chars: int = DEFAULT_RESULT_CHARS,
    ) -> Tool:
        """A tool from a function: its name, description and schema derived from it unless
        given. Raises BadTool when it cannot be offered."""
        context_parameter = _context_parameter(function)
        if parameters is None:
            parameters = schema_of(function)
        made = cls(
            name=name or getattr(function, "__name__", ""),
            function=function,
            description=description or _first_line(function.__doc__),
            parameters=parameters,
            soft_limit_s=soft_limit_s,
            max_result_chars=max_result_chars,
            context_parameter=context_parameter,
        )
        made.check()
        return made

    def check(self) -> None:
        if not TOOL_NAME.match(self.name):
            raise BadTool(f"tool name {self.name!r}: 1-64 of letters, digits, '_' and '-'")
        if not callable(self.function):
            raise BadTool(f"tool {self.name!r}: its function is not callable")
        if len(self.description) > MAX_DESCRIPTION_CHARS:
            raise BadTool(f"tool {self.name!r}: description over {MAX_DESCRIPTION_CHARS} chars")
        if not (0 < self.soft_limit_s <= 600):
            raise BadTool(f"tool {self.name!r}: soft_limit_s must be in (0, 600]")
        if not (1 <= self.max_result_chars <= MAX_RESULT_CHARS):
            raise BadTool(f"tool {self.name!r}: max_result_chars must be 1..{MAX_RESULT_CHARS}")
        if not isinstance(self.parameters, Mapping) or self.parameters.get("type") != "object":
            raise BadTool(f"tool {self.name!r}: its parameters schema must be of type object")
        try:
            encoded = json.dumps(self.parameters)
        except (TypeError, ValueError) as error:
            raise BadTool(f"tool {self.name!r}: schema is not JSON: {error}") from None
        if len(encoded.encode()) > MAX_SCHEMA_BYTES:
            raise BadTool(f"tool {self.name!r}: schema over {MAX_SCHEMA_BYTES} bytes")
        if _depth(self.parameters) > MAX_SCHEMA_DEPTH * 3:
            raise BadTool(f"tool {self.name!r}: schema nests too deep")

    def spec(self) -> dict[str, Any]:
        """What a backend offers the model: name, description, parameters."""
        return {
            "name": self.name,
            "description": self.description,
            "parameters": dict(self.parameters),
        }


def tools_of(items: tuple[Any, ...] | list[Any]) -> tuple[Tool, ...]:
    """A step's tools as Tool objects (bare functions derived), checked as a set."""
    made = tuple(item if isinstance(item, Tool) else Tool.of(item) for item in items)
    if len(made) > MAX_TOOLS_PER_STEP:
        raise BadTool(f"at most {MAX_TOOLS_PER_STEP} tools per step, got {len(made)}")
    names = [tool.name for tool in made]
    if len(set(names)) != len(names):
        raise BadTool(f"tool names must differ within a step, got {names}")
    for tool in made:
        tool.check()
    return made


# --- schema derivation ---------------------------------------------------------------------


def schema_of(function: Callable[..., Any]) -> dict[str, Any]:
    """The JSON schema of a function's keyword arguments, from its type hints. Parameters
    without a default are required; a StepContext parameter is left out."""
    try:
        signature = inspect.signature(function)
        hints = typing.get_type_hints(function)
    except (TypeError, ValueError, NameError) as error:
        raise BadTool(f"cannot read the signature of {function!r}: {error}") from None
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, parameter in signature.parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise BadTool(f"{function.__name__}: *args/**kwargs cannot be described to a model")
        if parameter.kind is parameter.POSITIONAL_ONLY:
            raise BadTool(f"{function.__name__}: positional-only parameter {name!r}")
        hint = hints.get(name, inspect.Parameter.empty)
        if _is_context(hint):
            continue
        if hint is inspect.Parameter.empty:
            raise BadTool(f"{function.__name__}: parameter {name!r} has no type hint")
        properties[name] = _type_schema(hint, f"{function.__name__}.{name}")
        if parameter.default is inspect.Parameter.empty:
            required.append(name)
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        schema["required"] = required
    return schema


_SCALARS: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _type_schema(hint: Any, where: str, depth: int = 0) -> dict[str, Any]:
    if depth > MAX_SCHEMA_DEPTH:
        raise BadTool(f"{where}: type nests too deep")
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    if hint is type(None):
        return {"type": "null"}
    origin = typing.get_origin(hint)
    arguments = typing.get_args(hint)
    if origin is Literal:
        if not arguments or not all(isinstance(a, (str, int, bool)) for a in arguments):
            raise BadTool(f"{where}: Literal values must be str, int or bool")
        return {"enum": list(arguments)}
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        if origin is tuple and not (len(arguments) == 2 and arguments[1] is Ellipsis):
            raise BadTool(f"{where}: only tuple[X, ...] is supported; use list[X]")
        item = arguments[0] if arguments else None
        if item is None:
            raise BadTool(f"{where}: a list needs its item type (list[str])")
        return {"type": "array", "items": _type_schema(item, where, depth + 1)}
    if origin in (Union, types.UnionType):
        options = [_type_schema(a, where, depth + 1) for a in arguments]
        return {"anyOf": options}
    raise BadTool(
        f"{where}: type {hint!r} is not supported (str, int, float, bool, list, Optional, "
        "Literal); give the tool an explicit schema"
    )


def _is_context(hint: Any) -> bool:
    """A StepContext hint, or an Optional one (so the function can be called without)."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return len(options) == 1 and _is_context(options[0])
    return getattr(hint, "__name__", "") == "StepContext" and getattr(
        hint, "__module__", ""
    ).startswith("agents")


def _context_parameter(function: Callable[..., Any]) -> str:
    try:
        hints = typing.get_type_hints(function)
    except (TypeError, NameError):
        return ""
    return next((name for name, hint in hints.items() if _is_context(hint)), "")


def _first_line(doc: str | None) -> str:
    lines = (doc or "").strip().splitlines()
    return lines[0].strip()[:MAX_DESCRIPTION_CHARS] if lines else ""


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_SCHEMA_DEPTH * 4:
        return level
    if isinstance(value, Mapping):
        return max((_depth(v, level + 1) for v in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level)
    return level


# --- argument validation -------------------------------------------------------------------


def parse_arguments(text: str, schema: Mapping[str, Any]) -> dict[str, Any]:
    """The model's arguments (JSON text) as a dict that fits `schema`, or BadArguments
    saying why not, in words a model can act on."""
    if len(text.encode()) > MAX_ARGUMENT_BYTES:
        raise BadArguments(f"arguments over {MAX_ARGUMENT_BYTES} bytes")
    try:
        value = json.loads(text) if text.strip() else {}
    except (ValueError, RecursionError) as error:
        raise BadArguments(f"arguments are not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise BadArguments("arguments must be a JSON object")
    check_value(value, schema, "arguments")
    return value


def check_value(value: Any, schema: Mapping[str, Any], where: str, depth: int = 0) -> None:
    """`value` against the subset of JSON schema that tools use: type, enum, properties,
    required, additionalProperties (false), items, anyOf. Other keywords are not checked
    (the tool still gets only JSON values)."""
    if depth > MAX_SCHEMA_DEPTH * 2:
        raise BadArguments(f"{where}: nested too deep")
    if "anyOf" in schema:
        options = schema["anyOf"]
        for option in options if isinstance(options, list) else ():
            try:
                check_value(value, option, where, depth + 1)
                break
            except BadArguments:
                continue
        else:
            raise BadArguments(f"{where}: fits none of the allowed types")
    if "enum" in schema and isinstance(schema["enum"], list):
        if not any(_same_json(value, allowed) for allowed in schema["enum"]):
            raise BadArguments(f"{where}: must be one of {schema['enum']}")
    expected = schema.get("type")
    if expected is not None:
        allowed = expected if isinstance(expected, list) else [expected]
        if not any(_is_type(value, kind) for kind in allowed):
            raise BadArguments(f"{where}: must be {' or '.join(map(str, allowed))}")
    if isinstance(value, dict):
        properties = schema.get("properties")
        properties = properties if isinstance(properties, Mapping) else {}
        for name in schema.get("required") or ():
            if name not in value:
                raise BadArguments(f"{where}: missing {name!r}")
        if schema.get("additionalProperties") is False:
            extra = sorted(set(value) - set(properties))
            if extra:
                raise BadArguments(f"{where}: unexpected {', '.join(map(repr, extra[:5]))}")
        for name, item in value.items():
            if name in properties and isinstance(properties[name], Mapping):
                check_value(item, properties[name], f"{where}.{name}", depth + 1)
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for index, item in enumerate(value):
            check_value(item, schema["items"], f"{where}[{index}]", depth + 1)


def _is_type(value: Any, kind: str) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer()
        )
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "null":
        return value is None
    if kind == "array":
        return isinstance(value, list)
    if kind == "object":
        return isinstance(value, dict)
    return True  # a type this checker does not know: not refused here


def _same_json(value: Any, allowed: Any) -> bool:
    # True == 1 in Python, not in JSON.
    return type(value) is type(allowed) and value == allowed


# --- results -------------------------------------------------------------------------------


def result_text(value: Any) -> str:
    """A tool's return value as the text the model reads: a str as it is, anything else
    as JSON (what JSON cannot hold, as its str())."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, default=str, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return str(value)


def truncated(text: str, limit: int) -> tuple[str, bool]:
    """`text` cut to at most `limit` characters, the cut said at its end."""
    if len(text) <= limit:
        return text, False
    marker = f"\n[truncated: {len(text) - limit} more characters]"
    keep = max(0, limit - len(marker))
    return text[:keep] + marker[: limit - keep], True
