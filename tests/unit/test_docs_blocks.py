"""Every fenced block of README.md and docs/*.md is accounted for: run by a test (here, or
against the real cluster by the test it names), or listed with the reason nothing can run
it here. A block added without an entry in EXAMPLES fails `test_every_block_is_accounted_for`.

Besides its entry's own check, every block gets the checks of its language:
- `python`: compiles, and each `from X import a, b` of a project module names what X has;
- `json`: parses (as one document, or JSON Lines);
- `sh`: every command is one the repository has, with options its parser accepts
  (`manage.py` commands and `python -m bench.X` parsed by their own argument parsers,
  `bin/dev` subcommands, `docker compose` services, files and directories named), and every
  variable set is one Switchboard reads (project/settings.py, the README's configuration
  table), the Artillery processor reads, docker-compose.yml interpolates, or a test suite's
  conftest.py reads.

The examples that need a running Switchboard are run in tests/integration/test_docs_examples.py
(and the JavaScript page example in tests/browser/test_docs_examples.py)."""

from __future__ import annotations

import ast
import importlib
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from project.launcher import ROOT

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SETTINGS = (ROOT / "project" / "settings.py").read_text()
README = (ROOT / "README.md").read_text()
PROCESSOR = (ROOT / "loadtest" / "artillery" / "processor.js").read_text()
COMPOSE_FILE = ROOT / "docker-compose.yml"
SWITCHBOARD_JS = ROOT / "realtime" / "static" / "switchboard" / "switchboard.js"
ARTILLERY = ROOT / "loadtest" / "artillery" / "node_modules" / ".bin" / "artillery"
# Read by a tool, not by Switchboard: Playwright's install script (an Artillery dependency).
TOOL_VARIABLES = {"PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"}
# Read by the tests (the optional suites' switches, such as tests/thirdparty's).
TEST_CONFTESTS = sorted((ROOT / "tests").glob("**/conftest.py"))


@dataclass(frozen=True)
class Block:
    document: str  # "README.md", "docs/protocol.md"
    line: int  # of the opening fence
    language: str
    text: str

    def __str__(self) -> str:
        return f"{self.document}:{self.line} ({self.language or 'no language'})"


def fenced_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, indented ones (in lists) included."""
    blocks: list[Block] = []
    opened: tuple[int, str, str] | None = None  # line, indent, language
    body: list[str] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = re.match(r"^(\s*)(```+|~~~+)\s*(\S*)", line)
        if opened is None:
            if fence:
                opened, body = (number, fence.group(1), fence.group(3)), []
        elif fence and not fence.group(3):
            start, indent, language = opened
            text = "\n".join(row.removeprefix(indent) for row in body) + "\n"
            blocks.append(Block(str(path.relative_to(ROOT)), start, language, text))
            opened = None
        else:
            body.append(line)
    assert opened is None, f"{path.name}: a block opened at line {opened[0]} is never closed"
    return blocks


def all_blocks() -> list[Block]:
    return [block for path in DOCUMENTS for block in fenced_blocks(path)]


# --- checks of one block ------------------------------------------------------------------


def check_cause_example(block: Block) -> None:
    """The `cause` of a triggered run's events: the fields the worker writes."""

    documented = json.loads(block.text)
    run = _run(depth=1, chain=["e1", "e2"])
    assert set(documented) == set(run.cause())


def check_restart_sequence(block: Block) -> None:
    """docs/protocol.md's reply.restart walk-through: the data fields the worker writes,
    offsets as a client must see them, and the done text made of the last attempt only."""
    from streams.runs import _RestartCall

    events = restart_sequence_events(block)
    kinds = [event["kind"] for event in events]
    assert kinds.count("reply.restart") == 1 and kinds[-1] == "reply.done"
    # A run id of the real form: the call names the run's keys, which embed its tenant.
    restart = _RestartCall(_run("r" + "0" * 32 + ".demo"), 2, "model_error", "", 1.0)
    # The event around the seq the script gives it.
    prefix, suffix = restart.script.restart_prefix, restart.script.restart_suffix
    written = json.loads(prefix + "1" + suffix)
    documented = next(event for event in events if event["kind"] == "reply.restart")
    assert set(documented["data"]) == set(written["data"])
    text, offset = "", 0
    for event in events:
        data = event["data"]
        if event["kind"] == "reply.delta":
            assert set(data) == {"run", "offset", "text"}
            assert data["offset"] == offset
            text, offset = text + data["text"], offset + len(data["text"])
        elif event["kind"] == "reply.restart":
            text, offset = "", 0
    assert events[-1]["data"]["text"] == text


def check_tool_sequence(block: Block) -> None:
    """docs/protocol.md's tool-call walk-through: the tool events are what the step's tool
    loop writes for that call (orchestration/tool_steps.py, run with a recording writer),
    deltas' offsets count text only, and reply.done names the tool."""
    import asyncio

    from agents import Tool
    from orchestration.tool_steps import run_call
    from workers.backends import ToolCall

    events = restart_sequence_events(block)
    documented = {event["kind"]: event["data"] for event in events if "tool" in event["kind"]}

    def weather(city: str) -> str:
        """Today's weather in a city."""
        return "Oslo: 4°C, rain"

    written: dict[str, dict[str, Any]] = {}

    class Writer:
        run = _run(step=0)

        def time_for_call(self) -> float:
            return 5.0

        async def append_tool_event(
            self, kind: str, data: dict[str, Any], tools_ran: list[str] | None = None
        ) -> None:
            written[kind] = data

    call = ToolCall("call_0", "weather", json.dumps(documented["tool.call"]["arguments"]))
    tools = {"weather": Tool.of(weather)}
    asyncio.run(run_call(Writer(), tools, call))  # type: ignore[arg-type]
    assert written == documented
    text, offset = "", 0
    for event in events:
        if event["kind"] == "reply.delta":
            assert event["data"]["offset"] == offset
            text, offset = text + event["data"]["text"], offset + len(event["data"]["text"])
    assert events[-1]["data"]["text"] == text
    detail = events[-1]["data"]["detail"]
    assert detail["tools"] == ["weather"] and set(detail) == {"tools", "usage"}
    usage = detail["usage"]
    assert usage["total"] == usage["prompt_tokens"] + usage["completion_tokens"]


def check_compact_sequence(block: Block) -> None:
    """docs/protocol.md's compact catch-up walk-through: the snapshot's data fields are the
    gateway's, its seq is within the window, and snapshot + live deltas make the done text;
    the clients' assembly agrees."""
    from client.connection import assembled_text
    from realtime.compaction import Compactor

    lines = block.text.splitlines()
    kind, answer = lines[0].split(maxsplit=1)
    assert kind == "subscribed"
    head = json.loads(answer)["head"]
    events = []
    for line in lines[1:]:
        kind, _, seq, data = line.split(maxsplit=3)
        data = data.replace("{…}", "{}")  # an event whose data does not matter here
        events.append({"kind": kind, "seq": int(seq), "data": json.loads(data)})
    snapshot = next(event for event in events if event["kind"] == "reply.snapshot")
    produced = Compactor(1).feed(
        [json.dumps({"seq": 1, "kind": "reply.delta", "data": {**snapshot["data"], "text": "x"}})]
    )
    assert set(json.loads(produced[0])["data"]) == set(snapshot["data"])
    assert snapshot["seq"] <= head < events[events.index(snapshot) + 1]["seq"]
    replies = [event for event in events if event["kind"].startswith("reply.")]
    live = replies[1]
    assert live["data"]["offset"] == len(snapshot["data"]["text"])
    assert assembled_text(replies[:-1]) == replies[-1]["data"]["text"]


def restart_sequence_events(block: Block) -> list[dict[str, Any]]:
    events = []
    for line in block.text.splitlines():
        kind, data = line.split(maxsplit=1)
        events.append({"type": "event", "kind": kind, "data": json.loads(data)})
    return events


def check_positions_example(block: Block) -> None:
    """`{"room":41,"alerts":7}  →  positions=...`: what the clients' encoder sends."""
    from client.connection import encode_positions

    source, encoded = (part.strip() for part in block.text.split("→"))
    assert encoded == "positions=" + encode_positions(json.loads(source))


def check_receipts_example(block: Block) -> None:
    """The receipts answer's body: the fields `StreamReceipts.as_json` gives."""
    from django.urls import resolve

    from streams.receipts import StreamReceipts

    request, _, response = block.text.partition("\n\n")
    assert request.startswith("GET /api/v1/receipts?stream=")
    body = json.loads(response[response.index("{") :])
    real = StreamReceipts("support:ticket-7", 42, {"alice": 42}).as_json()
    assert set(body) == set(real)
    assert set(body["receipts"][0]) == set(real["receipts"][0])
    resolve(urlsplit(request.split()[1]).path)  # a route of the gateway


def check_trace_example(block: Block) -> None:
    """The trace's lines: read by the replayer's own parser."""
    from loadtest.trace import read_trace

    trace = read_trace(block.text.splitlines(keepends=True))
    assert trace.header["tenant"] == "demo"
    assert len(trace.connections) == 3


def check_report_json_example(block: Block) -> None:
    """The abbreviated report: every field shown (all but the "..." placeholders) is one
    the report builder writes, at the same place."""
    from loadtest.report import Measurements, build_report

    meta = {"command": "replay_load", "url": "ws://x/", "tenant": "demo", "run_id": "r"}
    meta |= {"started_at": "t", "parameters": {}}
    sample = [(0.5, 10.0)]
    measured = Measurements(duration_s=1.0, ack=sample, reply=sample, delivery=sample)
    measured.connect = sample
    real = build_report(measured, meta)
    assert_fields_within(json.loads(block.text), real, "report")


def assert_fields_within(documented: Any, real: Any, where: str) -> None:
    if not isinstance(documented, dict) or not isinstance(real, dict):
        return
    for name, value in documented.items():
        if name == "...":
            continue
        assert name in real, f"{where}.{name} is not in a real report"
        if real[name]:  # parameters, by_code and the like are open-ended
            assert_fields_within(value, real[name], f"{where}.{name}")


def check_reply_assembler_example(block: Block, tmp_path: Path) -> None:
    """docs/clients.md's ReplyAssembler fragment, run in Node against the real client
    module, fed the reply.restart walk-through of docs/protocol.md."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    protocol = ROOT / "docs" / "protocol.md"
    (walkthrough,) = [b for b in fenced_blocks(protocol) if "reply.restart {" in b.text]
    events = restart_sequence_events(walkthrough)
    fragment = block.text.replace('"/client/switchboard.js"', json.dumps(SWITCHBOARD_JS.as_uri()))
    script = tmp_path / "fragment.mjs"
    script.write_text(
        "const handlers = [];\n"
        "const client = { on: (name, handler) => handlers.push([name, handler]) };\n"
        "const rendered = [];\n"
        "const render = (...args) => rendered.push(args);\n"
        + fragment
        + f"for (const event of {json.dumps(events)})\n"
        + "  for (const [name, handler] of handlers) if (name === 'event') handler(event);\n"
        + "console.log(JSON.stringify(rendered));\n"
    )
    result = subprocess.run(
        ["node", str(script)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    rendered = json.loads(result.stdout)
    assert len(rendered) == len(events)
    restart_at = [event["kind"] for event in events].index("reply.restart")
    assert rendered[restart_at] == ["r1", "", None]  # "text is "" right after a restart"
    assert rendered[-1] == ["r1", "ipsum dolor", "ok"]


def check_docker_example(block: Block) -> None:
    """No Docker here: the compose file's services, the Dockerfile's commands and the
    variables the example sets are checked to exist; the commands themselves by the
    shell checks (the manage.py ones inside `docker compose exec` by their parsers)."""
    assert {"redis", "postgres", "web", "worker", "beat", "prometheus", "grafana"} <= (
        compose_services()
    )
    dockerfile = (ROOT / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (?!--from)(\S+)", dockerfile, re.MULTILINE):
        assert (ROOT / source).exists(), source
    for command in re.findall(r"^RUN (python manage\.py .*)$", dockerfile, re.MULTILINE):
        check_command(shlex.split(command), ROOT)
    assert "collectstatic" in dockerfile
    for module in re.findall(r"(project\.\w+):application", dockerfile):
        assert importlib.util.find_spec(module), module


def _run(run_id: str = "r1", **fields: Any) -> Any:
    from streams.runs import Run

    return Run(
        run_id=run_id,
        tenant="demo",
        stream="support:42",
        agent="summariser",
        client="alice",
        message_id="m-17",
        message_event="e1",
        text="",
        options={},
        deadline=0.0,
        retention=100,
        attempt=1,
        emitted=0,
        step_base=0,
        owner="",
        **fields,
    )


# --- the examples ---------------------------------------------------------------------------

INTEGRATION = "tests/integration/test_docs_examples.py::"


@dataclass(frozen=True)
class Example:
    document: str
    marker: str  # text only this block of the document holds
    check: Callable[..., None] | None = None  # run here (besides the language's checks)
    run_by: str = ""  # "FILE::TEST": run against a real cluster by that test
    not_runnable: str = ""  # why it cannot run here

    def __str__(self) -> str:
        return f"{self.document}: {self.marker!r}"


EXAMPLES = [
    Example(
        "README.md",
        "bin/dev start    # run everything",
        not_runnable="`bin/dev start` runs until Ctrl-C and `bin/dev test` is this suite "
        "(CI runs it); both subcommands are checked to exist",
    ),
    Example(
        "README.md",
        '"chunks": 3, "chunk_delay_ms"',
        run_by=INTEGRATION + "test_readme_python_example",
    ),
    Example(
        "README.md",
        "SWITCHBOARD_OPENAI_BASE_URL=http://127.0.0.1:8080/v1",
        run_by=INTEGRATION + "test_readme_local_model_lines_name_real_settings",
        not_runnable="needs llama.cpp's or Ollama's server; the cluster's own fake "
        "OpenAI-compatible provider is reached through the same three settings",
    ),
    Example(
        "README.md",
        "docker compose up --build",
        check=check_docker_example,
        not_runnable="there is no Docker here",
    ),
    Example(
        "docs/agents.md", "# support/agents.py", run_by=INTEGRATION + "test_agents_doc_definitions"
    ),
    Example(
        "docs/agents.md",
        "export SWITCHBOARD_OPENAI_BASE_URL",
        not_runnable="sets the environment of a deployment; the variables are checked",
    ),
    Example("docs/agents.md", "async def ask(", run_by=INTEGRATION + "test_agents_doc_client"),
    Example(
        "docs/agents.md", 'name="resilient"', run_by=INTEGRATION + "test_agents_doc_definitions"
    ),
    Example(
        "docs/agents.md", "def check_answer(", run_by=INTEGRATION + "test_agents_doc_definitions"
    ),
    Example(
        "docs/agents.md", 'name="summariser"', run_by=INTEGRATION + "test_agents_doc_definitions"
    ),
    Example("docs/agents.md", '"prev": "<assistant', check=check_cause_example),
    Example(
        "docs/agents.md",
        "SWITCHBOARD_LLAMA_PYTHON=../llama-env/bin/python",
        not_runnable="installs llama-cpp-python, a C++ build of minutes, into an environment "
        "of its own; its commands and variable are checked, and the tests it runs skip here "
        "without it",
    ),
    Example(
        "docs/agents.md", "# weather/agents.py", run_by=INTEGRATION + "test_agents_doc_definitions"
    ),
    Example(
        "docs/architecture.md",
        "clients ──WebSocket──▶ gateway",
        not_runnable="a diagram of the processes, not an example",
    ),
    Example(
        "docs/clients.md",
        '<p id="reply"></p>',
        run_by="tests/browser/test_docs_examples.py::test_clients_javascript_example",
    ),
    Example("docs/clients.md", "new ReplyAssembler()", check=check_reply_assembler_example),
    Example("docs/clients.md", "ReconnectingClient.connect(", run_by=INTEGRATION + "test_clients"),
    Example(
        "docs/operations.md",
        "record 10% of acme's connections",
        run_by="tests/integration/test_load_commands.py::test_record_replay_and_loadgen_reports",
        not_runnable="names a tenant acme, a staging host and a five-minute recording: the "
        "commands' behaviour is run by the test named, their exact lines parsed here",
    ),
    Example(
        "docs/operations.md",
        "replay_load loadtest/sample_trace.jsonl",
        run_by=INTEGRATION + "test_operations_sample_trace_replay_runs_as_written",
    ),
    Example("docs/operations.md", '{"trace":{"version":1', check=check_trace_example),
    Example(
        "docs/operations.md",
        "ack latency: p50",
        run_by=INTEGRATION + "test_operations_sample_trace_replay_runs_as_written",
    ),
    Example("docs/operations.md", '"command": "replay_load"', check=check_report_json_example),
    Example(
        "docs/operations.md",
        "npx artillery run switchboard.yml",
        run_by="tests/integration/test_artillery.py::test_each_user_chats_and_is_measured",
        not_runnable="the test runs the scenario with its own phases (seconds, not the "
        "scenario's); the lines' files and options are checked here",
    ),
    Example(
        "docs/operations.md",
        "celery -A project flower",
        not_runnable="Flower is not a dependency of the project; the Celery app is checked",
    ),
    Example(
        "docs/performance.md",
        "python -m bench.e2e",
        not_runnable="benchmarks take minutes and the whole machine; each line is parsed "
        "by its benchmark's own argument parser",
    ),
    *(
        Example("docs/protocol.md", marker, run_by=INTEGRATION + "test_protocol_doc_frames")
        for marker in (
            '"type":"welcome"',
            '"type":"ack"',
            '"code":"forbidden"',
            '"kind":"reply.delta"',
            '"kind":"join"',
            '"code":"rate_limited"',
        )
    ),
    Example(
        "docs/protocol.md",
        '"code":"budget_exhausted"',
        run_by="tests/integration/test_usage.py::"
        "test_a_spent_daily_budget_refuses_the_next_send_until_it_resets",
    ),
    Example("docs/protocol.md", "reply.restart {", check=check_restart_sequence),
    Example("docs/protocol.md", "reply.snapshot seq", check=check_compact_sequence),
    Example("docs/protocol.md", 'tool.call    {"run"', check=check_tool_sequence),
    Example("docs/protocol.md", "positions=eyJ", check=check_positions_example),
    Example("docs/protocol.md", "GET /api/v1/receipts", check=check_receipts_example),
]


def example_of(block: Block) -> Example:
    matches = [e for e in EXAMPLES if e.document == block.document and e.marker in block.text]
    assert len(matches) == 1, (
        f"{block}: {len(matches)} entries of EXAMPLES in {__name__} match this block; add one "
        "that runs it (a check here, or run_by a test) or says why it cannot run here"
    )
    return matches[0]


def test_every_block_is_accounted_for() -> None:
    blocks = all_blocks()
    assert len(blocks) >= len(EXAMPLES)
    matched = [example_of(block) for block in blocks]
    for example in EXAMPLES:
        assert matched.count(example) == 1, f"{example} matches {matched.count(example)} blocks"
        assert example.check or example.run_by or example.not_runnable, example


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.run_by], ids=str)
def test_the_tests_running_examples_exist(example: Example) -> None:
    path, _, name = example.run_by.partition("::")
    assert re.search(rf"^(async )?def {re.escape(name)}", (ROOT / path).read_text(), re.M), (
        example.run_by
    )


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.check], ids=str)
def test_example_does_what_its_text_says(example: Example, tmp_path: Path) -> None:
    (block,) = [
        b for b in all_blocks() if b.document == example.document and example.marker in b.text
    ]
    check = example.check
    assert check is not None
    if "tmp_path" in check.__code__.co_varnames[: check.__code__.co_argcount]:
        check(block, tmp_path)
    else:
        check(block)


# --- checks by language ---------------------------------------------------------------------


@pytest.mark.parametrize("block", [b for b in all_blocks() if b.language == "python"], ids=str)
def test_python_blocks_compile_against_the_real_modules(block: Block) -> None:
    tree = ast.parse(block.text, block.document)
    compile(tree, block.document, "exec")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)


@pytest.mark.parametrize("block", [b for b in all_blocks() if b.language == "json"], ids=str)
def test_json_blocks_parse(block: Block) -> None:
    try:
        json.loads(block.text)
    except json.JSONDecodeError:
        for line in block.text.splitlines():  # JSON Lines
            json.loads(line)


@pytest.mark.parametrize("block", [b for b in all_blocks() if b.language == "sh"], ids=str)
def test_shell_blocks_name_real_commands_options_and_variables(block: Block) -> None:
    directory = ROOT
    for command in shell_commands(block.text):
        words = shlex.split(command)
        if words[0] == "export":
            words = words[1:]
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
            check_variable(words.pop(0).split("=")[0], command)
        if not words:
            continue
        if words[0] == "cd":
            directory = directory / words[1]
            assert directory.is_dir(), command
            continue
        check_command(words, directory)


def shell_commands(text: str) -> list[str]:
    """One string per command: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(shlex.join(words))
    return commands


def check_variable(name: str, command: str) -> None:
    known = (
        f'"{name}"' in SETTINGS
        or f"| `{name}` |" in README
        or f"process.env.{name}" in PROCESSOR
        or name in TOOL_VARIABLES
        or any(f'"{name}"' in conftest.read_text() for conftest in TEST_CONFTESTS)
        or ("docker compose" in command and "${" + name in COMPOSE_FILE.read_text())
    )
    assert known, f"{command}: nothing reads {name}"


def check_command(words: list[str], directory: Path) -> None:
    program, args = words[0], words[1:]
    if program in ("python", ".venv/bin/python") and args[:1] == ["manage.py"]:
        check_manage_command(args[1:])
    elif program in ("python", ".venv/bin/python") and args[:1] == ["-m"]:
        check_python_module(args[1], args[2:])
    elif program == "bin/dev":
        case = re.search(
            r'^case "\$\{1:-\}" in\n(.*?)^esac', (ROOT / "bin/dev").read_text(), re.M | re.S
        )
        assert case and re.search(rf"^\s+{re.escape(args[0])}\)", case.group(1), re.M), words
    elif program == "docker" and args[:1] == ["compose"]:
        check_compose_command(args[1:])
    elif program == "npm" and args == ["ci"]:
        assert (directory / "package-lock.json").exists(), directory
    elif program == "npx" and args[:1] == ["artillery"]:
        check_artillery_command(args[1:], directory)
    elif program == "python3" and args[:2] == ["-m", "venv"]:
        pass  # a virtual environment of its own, for a tool the suite does not install
    elif program.endswith("bin/pip") and args[:1] == ["install"]:
        pass  # a package from PyPI, named in the text
    elif program == ".venv/bin/celery" and args[:2] == ["-A", "project"]:
        assert importlib.util.find_spec("project.celery"), words
    else:
        raise AssertionError(f"{shlex.join(words)}: teach check_command about {program}")


def check_manage_command(args: list[str]) -> None:
    from django.core.management import get_commands, load_command_class

    name = args[0]
    commands = get_commands()
    assert name in commands, f"manage.py has no command {name}"
    command = load_command_class(commands[name], name)
    # Called from code, Django's parser raises CommandError instead of exiting.
    command.create_parser("manage.py", name).parse_args(args[1:])


def check_python_module(module: str, args: list[str]) -> None:
    if module == "pytest":
        for path in (arg.partition("::")[0] for arg in args if not arg.startswith("-")):
            assert (ROOT / path).exists(), f"pytest {path}: no such test path"
        return
    assert module.startswith("bench."), f"-m {module}: only the benchmarks are checked"
    parse_args = importlib.import_module(module).parse_args
    try:
        parse_args(args)
    except SystemExit as exit:  # argparse's way of refusing
        raise AssertionError(f"python -m {module} {shlex.join(args)}: refused") from exit


def check_compose_command(args: list[str]) -> None:
    services = compose_services()
    if args[0] == "exec":
        assert args[1] in services, args
        check_command(args[2:], ROOT)
    else:
        assert args[0] == "up", args


def compose_services() -> set[str]:
    """The services of docker-compose.yml (no YAML parser is a dependency: its top-level
    `services:` map, two-space indented)."""
    text = COMPOSE_FILE.read_text()
    section = re.search(r"^services:\n(.*?)(?=^\S)", text, re.M | re.S)
    assert section, "docker-compose.yml has no services"
    return set(re.findall(r"^  ([\w-]+):\s*$", section.group(1), re.M))


def check_artillery_command(args: list[str], directory: Path) -> None:
    package = json.loads((directory / "package.json").read_text())
    assert "artillery" in package.get("dependencies", {}) | package.get("devDependencies", {})
    assert args[0] == "run", args
    options = [arg for arg in args[1:] if arg.startswith("--")]
    files = [
        arg
        for i, arg in enumerate(args[1:], 1)
        if not arg.startswith("-") and not args[i - 1].startswith("--")
    ]
    for name in files:
        assert (directory / name).exists(), name
    if ARTILLERY.exists():
        usage = subprocess.run(
            [str(ARTILLERY), "run", "--help"], capture_output=True, text=True, timeout=60
        ).stdout
        for option in options:
            assert re.search(rf"{option}[=\s]", usage), f"artillery run has no {option}"
