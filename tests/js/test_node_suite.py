"""Runs the JavaScript tests (web/chart_core.js, web/acestep_lora.js) under pytest, so `make test` covers them.

Same as `node --test tests/js/`; skipped when Node.js (>= 18, for node:test) is not installed.
"""
import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _node():
    node = shutil.which("node")
    if node is None:
        return None
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip().lstrip("v")
    return node if version and int(version.split(".")[0]) >= 18 else None


@pytest.mark.skipif(_node() is None, reason="Node.js >= 18 not installed")
def test_javascript_suite():
    files = sorted(os.path.join("tests", "js", f) for f in os.listdir(HERE) if f.endswith(".test.mjs"))
    assert files, "no tests/js/*.test.mjs found"
    result = subprocess.run([_node(), "--test", *files], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
