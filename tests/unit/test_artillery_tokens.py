"""The Artillery processor (loadtest/artillery/processor.js) signs tokens the gateway
accepts: the same claims and HS256 signature as manage.py issue_token."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import jwt
import pytest

from project.launcher import ROOT
from tenants.tokens import TOKEN_ALGORITHM

PROCESSOR = ROOT / "loadtest" / "artillery" / "processor.js"
SECRET = "a-tenant-secret-of-at-least-32-bytes"


def test_the_processor_signs_tokens_like_issue_token() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    script = (
        f"const p = require({json.dumps(str(PROCESSOR))});"
        f"process.stdout.write(p.signToken({json.dumps(SECRET)}, 'acme', 'vu-1', 600));"
    )
    token = subprocess.run(
        [node, "-e", script], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    claims = jwt.decode(token, SECRET, algorithms=[TOKEN_ALGORITHM])
    assert (claims["sub"], claims["tnt"]) == ("vu-1", "acme")
    assert 590 <= claims["exp"] - time.time() <= 600
