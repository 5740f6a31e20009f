"""`gpuaas report` and `gpuaas cluster` run without loading kopf or the handlers: they start fast and work where
only the report's dependencies matter."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "command", [["report", "--help"], ["cluster", "status", "--help"], ["cluster", "up", "--help"]]
)
def test_commands_other_than_run_do_not_load_kopf(command: list[str]) -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from gpuaas.cli import app\n"
        f"result = CliRunner().invoke(app, {command!r})\n"
        "assert result.exit_code == 0, result.output\n"
        "print(sorted(m for m in sys.modules if m == 'kopf' or m.startswith(('kopf.', 'gpuaas.handlers'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"{' '.join(command)} loaded {result.stdout.strip()}"


def test_run_loads_the_handlers() -> None:
    """The check above can fail: `gpuaas run` does load kopf (imported lazily in the command)."""
    code = "import sys\nimport gpuaas.handlers.runner\nprint('kopf' in sys.modules)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.stdout.strip() == "True", result.stderr
