"""`gpuaas report` and `gpuaas cluster` run without loading kopf or the handlers: they start fast and work where
only the report's dependencies matter."""

from __future__ import annotations

import subprocess
import sys

import pytest


def in_fresh_process(code: str) -> subprocess.CompletedProcess[str]:
    """Runs `code` in a new interpreter, so that what it imports is its own."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)


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
    result = in_fresh_process(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"{' '.join(command)} loaded {result.stdout.strip()}"


def test_run_loads_the_handlers() -> None:
    """The check above can fail: `gpuaas run` does load kopf (imported lazily in the command)."""
    code = "import sys\nimport gpuaas.handlers.runner\nprint('kopf' in sys.modules)\n"
    result = in_fresh_process(code)
    assert result.stdout.strip() == "True", result.stderr


def test_the_report_loads_neither_the_local_cluster_nor_the_spreadsheet_writer_until_asked() -> None:
    """Start-up is most of a CSV report's time (issue 11): openpyxl is loaded for --format xlsx only, and the local
    cluster's modules for `gpuaas cluster` only."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from gpuaas.cli import app\n"
        "assert CliRunner().invoke(app, ['report', '--help']).exit_code == 0\n"
        "loaded = ('openpyxl', 'gpuaas.k8s.localcluster', 'rich.progress', 'kubernetes')\n"
        "print(sorted(m for m in loaded if m in sys.modules))\n"
        "from gpuaas.reporting.formats import render\n"
        "from gpuaas.domain.report import Report\n"
        "render(Report(month='2026-11', time_zone='UTC', rows=(), totals=()), 'xlsx')\n"
        "print('openpyxl' in sys.modules)\n"
    )
    result = in_fresh_process(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", "True"]


def test_a_report_prints_its_messages_without_loading_rich() -> None:
    """rich's import was about a tenth of a report's start-up; `gpuaas cluster` still loads it for its messages."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from gpuaas import cli\n"
        "result = CliRunner().invoke(cli.app, ['report', '--month', '2026-11', '--kubeconfig', '/nonexistent'])\n"
        "print(result.exit_code, 'rich' in sys.modules)\n"
        "print(result.output.strip())\n"
        "cli.console.print('cluster [bold]x[/] exists; reusing it')\n"
        "print('rich' in sys.modules)\n"
    )
    result = in_fresh_process(code)
    assert result.returncode == 0, result.stderr
    report, message, loaded_after = result.stdout.splitlines()
    assert report == "1 False"  # refused, with its message, and rich not loaded
    assert message.startswith("error: cannot read the ledger of the cluster (kubeconfig /nonexistent)")
    assert loaded_after == "True"
    assert result.stderr.strip() == "cluster x exists; reusing it"  # markup rendered, on stderr
