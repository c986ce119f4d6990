"""The Lua layout (streams/scripts.py): every script is a file in streams/lua/ that binds
KEYS and ARGV to named locals in its header and uses only those names after it; shared
fragments resolve; each typed wrapper passes keys and arguments in the header's order."""

from __future__ import annotations

import dataclasses
import re

import pytest

from streams import scripts

LUA_FILES = sorted(path.name for path in scripts.LUA_DIR.glob("*.lua"))
WRAPPERS = scripts.all_scripts()
SCRIPT_FILES = {wrapper.LUA.name for wrapper in WRAPPERS}

# `local a, b = KEYS[1], tonumber(ARGV[2])` or `local rest = {unpack(ARGV, 3)}`.
BINDING = re.compile(r"^local (?P<names>\w+(?:, \w+)*) = (?P<values>.+)$")
REFERENCE = re.compile(r"\b(KEYS|ARGV)\[(\d+)\]|unpack\((KEYS|ARGV), (\d+)\)")
KEYS_OR_ARGV = re.compile(r"\b(KEYS|ARGV)\b")


def includes(name: str) -> list[str]:
    text = (scripts.LUA_DIR / name).read_text(encoding="utf-8")
    return [found["name"] for found in scripts.INCLUDE.finditer(text)]


def code(line: str) -> str:
    """The line without its comment (no script has `--` inside a string)."""
    return line.split("--", 1)[0]


def header_and_body(name: str) -> tuple[list[str], list[str]]:
    """The script's binding lines (after its opening comment, up to the first line that is
    not a `local` binding), and every line after them."""
    lines = (scripts.LUA_DIR / name).read_text(encoding="utf-8").splitlines()
    start = 0
    while start < len(lines) and lines[start].startswith("--"):
        start += 1
    end = start
    while end < len(lines) and BINDING.match(lines[end]):
        end += 1
    return lines[start:end], lines[end:]


def bindings(name: str) -> dict[str, dict[int, str]]:
    """{"KEYS": {index: name}, "ARGV": {...}}; a tail bound by unpack is `*name`."""
    bound: dict[str, dict[int, str]] = {"KEYS": {}, "ARGV": {}}
    header, _ = header_and_body(name)
    for line in header:
        match = BINDING.match(line)
        assert match is not None
        names = match["names"].split(", ")
        references = REFERENCE.findall(match["values"])
        if not references:
            continue  # a local computed from other names: allowed, binds nothing
        assert len(references) == len(names), f"{name}: one KEYS/ARGV per name: {line!r}"
        for local, (table, index, tail_table, tail_index) in zip(names, references, strict=True):
            if table:
                bound[table][int(index)] = local
            else:
                bound[tail_table][int(tail_index)] = f"*{local}"
    return bound


def test_every_include_resolves_and_every_file_is_used() -> None:
    included: set[str] = set()
    for name in LUA_FILES:
        for fragment in includes(name):
            assert (scripts.LUA_DIR / fragment).is_file(), f"{name} includes missing {fragment}"
            included.add(fragment)
        scripts.lua_source(name)  # no cycle
    # A file is a script with its wrapper, or a fragment some file includes: never both,
    # never neither.
    assert SCRIPT_FILES.isdisjoint(included)
    assert set(LUA_FILES) == SCRIPT_FILES | included


def test_loaded_sources_hold_no_include_lines() -> None:
    for wrapper in WRAPPERS:
        assert "#include" not in wrapper.LUA.source, wrapper.__name__


def test_an_include_cycle_is_refused(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.lua").write_text("-- #include b.lua\n")
    (tmp_path / "b.lua").write_text("-- #include a.lua\n")
    monkeypatch.setattr(scripts, "LUA_DIR", tmp_path)
    with pytest.raises(ValueError, match="a.lua -> b.lua -> a.lua"):
        scripts.lua_source("a.lua")


@pytest.mark.parametrize("name", sorted(SCRIPT_FILES))
def test_a_script_indexes_keys_and_argv_only_in_its_header(name: str) -> None:
    header, body = header_and_body(name)
    assert header, f"{name} binds nothing"
    for line in body:
        assert not KEYS_OR_ARGV.search(code(line)), f"{name}: {line!r}"
    bound = bindings(name)
    for table, by_index in bound.items():
        fixed = sorted(index for index, local in by_index.items() if not local.startswith("*"))
        assert fixed == list(range(1, len(fixed) + 1)), f"{name}: {table} bound with gaps"


@pytest.mark.parametrize("name", sorted({include for n in LUA_FILES for include in includes(n)}))
def test_a_fragment_never_touches_keys_or_argv(name: str) -> None:
    text = (scripts.LUA_DIR / name).read_text(encoding="utf-8")
    for line in text.splitlines():
        assert not KEYS_OR_ARGV.search(code(line)), f"{name}: {line!r}"


@pytest.mark.parametrize("wrapper", WRAPPERS, ids=lambda wrapper: wrapper.__name__)
def test_a_wrapper_passes_keys_and_args_in_the_headers_order(
    wrapper: type[scripts.Script[object]],
) -> None:
    bound = bindings(wrapper.LUA.name)
    for table, names, tail in (
        ("KEYS", wrapper.KEYS, wrapper.KEYS_TAIL),
        ("ARGV", wrapper.ARGV, wrapper.ARGV_TAIL),
    ):
        expected = {index + 1: name for index, name in enumerate(names)}
        if tail:
            expected[len(names) + 1] = f"*{tail}"
        assert bound[table] == expected, f"{wrapper.__name__} {table}"


@pytest.mark.parametrize("wrapper", WRAPPERS, ids=lambda wrapper: wrapper.__name__)
def test_a_wrapper_has_a_field_for_each_name(wrapper: type[scripts.Script[object]]) -> None:
    fields = {field.name for field in dataclasses.fields(wrapper)}
    own = set(wrapper.KEYS) | set(wrapper.ARGV) | {wrapper.KEYS_TAIL, wrapper.ARGV_TAIL}
    if issubclass(wrapper, scripts._PresenceScript):
        # The keys and arguments every per-stream presence script shares, in one field.
        shared = {field.name for field in dataclasses.fields(scripts.PresenceStream)}
        assert shared == set(scripts._PRESENCE_KEYS) | set(scripts._PRESENCE_ARGV)
        own = (own - shared) | {"stream"}
    assert fields == own - {""}


def test_a_call_lists_its_keys_and_args_in_order() -> None:
    call = scripts.TakeTokens(buckets=["{t}b1", "{t}b2"], cost=2, limits=[5.0, 10, 1.0, 3])
    assert call.keys() == ["{t}b1", "{t}b2"]
    assert call.args() == [2, 5.0, 10, 1.0, 3]
    leave = scripts.PresenceLeave(
        stream=scripts.PresenceStream("m", "c", "n", "i", "l", "ch", "t:s", '"s"', "p", '"ts"', 50),
        gateway="g",
        client="c1",
    )
    assert leave.keys() == ["m", "c", "n", "i", "l"]
    assert leave.args() == ["ch", "t:s", '"s"', "p", '"ts"', 50, "g", "c1"]


def test_the_publish_fragment_is_sharded_for_a_redis_cluster() -> None:
    single = scripts.lua_source("append_delta.lua")
    sharded = scripts.lua_source("append_delta.lua", sharded=True)
    assert "redis.call('PUBLISH', channel, message)" in single
    assert "redis.call('SPUBLISH', channel, message)" in sharded
    assert "'PUBLISH'" not in sharded
    # The worker-stop broadcast stays a classic publish: its channel names no tenant.
    assert "redis.call('PUBLISH', worker_stop_prefix" in scripts.lua_source(
        "finalize_run.lua", sharded=True
    )
