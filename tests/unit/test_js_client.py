"""The JavaScript client's unit tests (tests/js/, Node's own test runner), run as part of
the Python suite so `bin/dev test` and CI run them too."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from project.launcher import ROOT


def test_javascript_client_unit_tests_pass() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed; the browser tests still drive the client")
    # Files, not the directory: newer Node reads --test arguments as glob patterns.
    files = sorted(
        str(path.relative_to(ROOT)) for path in (ROOT / "tests" / "js").glob("*.test.mjs")
    )
    assert files, "no JavaScript tests found"
    result = subprocess.run(
        [node, "--test", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
