"""The examples of the README and docs/ run as written, against the real cluster, and do
what the text around them says they do. A newcomer copies these first: an example whose
output differs from its description is a bug."""

from __future__ import annotations

import ast
import asyncio
import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import agents
from project.launcher import ROOT

from .conftest import Connect, Switchboard

SETTINGS = (ROOT / "project" / "settings.py").read_text()


def block_after(path: Path, language: str, marker: str) -> str:
    """The first `language` block after the text `marker`."""
    text = path.read_text()
    start = text.index(marker)
    return code_blocks_in(text[start:], language)[0]


def code_blocks_in(text: str, language: str) -> list[str]:
    """The fenced blocks of `language` in Markdown text, in order."""
    pattern = re.compile(rf"^```{language}\n(.*?)^```", re.DOTALL | re.MULTILINE)
    return pattern.findall(text)


@pytest.mark.asyncio
async def test_readme_python_example_prints_what_the_readme_says(
    switchboard: Switchboard, tmp_path: Path, unique: Callable[[str], str]
) -> None:
    readme = ROOT / "README.md"
    script = block_after(readme, "python", "save this as `try_echo.py`")
    # The example writes to the stream "demo": a fresh one, as the text assumes.
    stream = unique("demo")
    assert '"stream": "demo"' in script
    path = tmp_path / "try_echo.py"
    path.write_text(script.replace('"stream": "demo"', f'"stream": "{stream}"'))
    url = f"{switchboard.url}?token={switchboard.token(unique('newcomer'))}"
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(path), url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # "You see the welcome, the ack, your own message event (seq 1 on a new stream), three
    # reply.delta events with contiguous offsets, and one reply.done whose text is the
    # pieces joined."
    assert json.loads(lines[0])["type"] == "welcome"
    frames: list[dict[str, Any]] = [ast.literal_eval(line) for line in lines[1:]]
    assert frames[0]["type"] == "ack"
    kinds = [frame.get("kind") for frame in frames[1:]]
    assert kinds == ["message", "reply.delta", "reply.delta", "reply.delta", "reply.done"]
    assert frames[1]["seq"] == 1
    deltas = [frame["data"] for frame in frames[2:5]]
    offset = 0
    for delta in deltas:
        assert delta["offset"] == offset
        offset += len(delta["text"])
    done = frames[5]["data"]
    assert done["status"] == "ok"
    assert done["text"] == "".join(delta["text"] for delta in deltas) == "hi there"


def test_readme_local_model_lines_name_real_settings() -> None:
    """The two lines pointing the example agents at llama.cpp or Ollama set variables
    Switchboard reads (the integration cluster itself reaches its fake OpenAI-compatible
    provider through the same three)."""
    readme = (ROOT / "README.md").read_text()
    block = code_blocks_in(readme[readme.index("pointed at it:") :], "sh")[0]
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) == 2
    for line in lines:
        names = re.findall(r"\b(SWITCHBOARD_[A-Z_]+)=", line)
        assert names == [
            "SWITCHBOARD_OPENAI_BASE_URL",
            "SWITCHBOARD_OPENAI_MODEL",
            "SWITCHBOARD_OPENAI_API_KEY_ENV",
        ]
        for name in names:
            assert f'env_str("{name}"' in SETTINGS, name
        assert line.split("#")[0].rstrip().endswith("bin/dev start")


@pytest.mark.asyncio
async def test_clients_python_example_runs(
    switchboard: Switchboard, unique: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    source = block_after(ROOT / "docs" / "clients.md", "python", "## Python")
    namespace: dict[str, Any] = {}
    exec(compile(source, "docs/clients.md", "exec"), namespace)  # noqa: S102
    client = unique("reader")
    await namespace["main"](switchboard.url, switchboard.token(client))
    printed = capsys.readouterr().out.splitlines()
    assert "ok Hello!" in printed
    # presence: this client, on the stream it subscribed to.
    assert any(client in line for line in printed if line.startswith("[")), printed


@pytest.mark.asyncio
async def test_agents_doc_client_example_runs(
    switchboard: Switchboard, unique: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    source = block_after(ROOT / "docs" / "agents.md", "python", "A client then talks to it")
    namespace: dict[str, Any] = {}
    exec(compile(source, "docs/agents.md", "exec"), namespace)  # noqa: S102
    await namespace["ask"](switchboard.url, switchboard.token(unique("asker")))
    text, status = capsys.readouterr().out.splitlines()[-2:]
    # The cluster's assistant calls the fake provider, which streams the prompt back.
    assert status == "ok"
    assert "How do I reset my password?" in text


@pytest.mark.parametrize(
    "marker",
    [
        "Make an app (or use one",
        "The `triage` example",
        "An agent subscribes to",
        "The failover example",
        "A model step may offer its model **tools**",
    ],
)
def test_agents_doc_definitions_register(marker: str) -> None:
    """Each agent definition of docs/agents.md registers (validated as at start-up)."""
    source = block_after(ROOT / "docs" / "agents.md", "python", marker)
    saved = dict(agents._registry)
    try:
        exec(compile(textwrap.dedent(source), "docs/agents.md", "exec"), {})  # noqa: S102
        defined = set(agents._registry) - set(saved) | {
            name for name in saved if agents._registry[name] is not saved[name]
        }
        assert defined, "the example registered no agent"
    finally:
        agents._registry.clear()
        agents._registry.update(saved)


@pytest.mark.asyncio
async def test_protocol_doc_frames_have_the_fields_real_frames_have(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    """docs/protocol.md's example frames: the same fields as what the gateway sends."""
    text = (ROOT / "docs" / "protocol.md").read_text()
    welcome_doc, ack_doc, error_doc, delta_doc, join_doc, limited_doc = (
        json.loads(block) for block in code_blocks_in(text, "json")[:6]
    )
    client = await connect()
    assert set(client.welcome) == set(welcome_doc)
    assert set(client.welcome["limits"]) == set(welcome_doc["limits"])
    ack = await client.send(unique("room"), "echo", "Hello", options={"chunks": 2})
    assert set(ack) == set(ack_doc)
    deltas, done = await client.reply(ack["id"])
    assert set(deltas[0]) == set(delta_doc)
    assert set(deltas[0]["data"]) == set(delta_doc["data"])
    assert set(done["data"]) >= {"run", "status", "text"}
    assert set(error_doc) == set(limited_doc) - {"retry_after_ms"}
    assert join_doc["kind"] == "join" and set(join_doc) == set(delta_doc) - {"seq"}


def test_every_variable_the_docs_shell_examples_set_is_read() -> None:
    """A variable set in a shell example of the README or docs/ is one Switchboard (its
    settings), the Artillery processor or a test suite's switch (its conftest.py) reads: no
    example sets a misspelt or removed one."""
    processor = (ROOT / "loadtest" / "artillery" / "processor.js").read_text()
    conftests = [path.read_text() for path in (ROOT / "tests").glob("**/conftest.py")]
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    checked = 0
    for document in documents:
        for block in code_blocks_in(document.read_text(), "sh"):
            for name in re.findall(r"\b(SWITCHBOARD_[A-Z0-9_]+)=", block):
                assert (
                    f'"{name}"' in SETTINGS
                    or f"process.env.{name}" in processor
                    or any(f'"{name}"' in conftest for conftest in conftests)
                ), (
                    document.name,
                    name,
                )
                checked += 1
    assert checked >= 8


@pytest.mark.asyncio
async def test_operations_sample_trace_replay_runs_as_written(
    switchboard: Switchboard, tmp_path: Path
) -> None:
    """docs/operations.md's "small trace to try", its command as written, the URL aside."""
    docs = ROOT / "docs" / "operations.md"
    command = block_after(docs, "sh", "The repository has a small trace to try")
    assert "ws://127.0.0.1:8000/ws/v1/" in command and "--tenant demo" in command
    await asyncio.to_thread(switchboard.cluster.manage, "create_tenant", "demo")
    command = command.replace("ws://127.0.0.1:8000/ws/v1/", switchboard.url).replace(
        "sample.png", str(tmp_path / "sample.png")
    )
    result = await asyncio.to_thread(
        subprocess.run,
        ["bash", "-c", command],
        cwd=ROOT,
        env={**switchboard.cluster.child_env()},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # The report's lines as the docs show them.
    for start in ("ack latency:", "reply latency:", "throughput:", "frames: 150 sent of 150"):
        assert any(line.startswith(start) for line in result.stdout.splitlines()), start
    assert "errors: none" in result.stdout
    assert (tmp_path / "sample.png").read_bytes().startswith(b"\x89PNG")
