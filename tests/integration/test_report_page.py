"""The HTML report as a person sees it: rendered by headless Chromium (Debian's, installed by `make setup`) into a
screenshot, whose pixels must show the charts' bars and the tables' text."""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from gpuaas.domain.report import build_report
from gpuaas.reporting import to_html
from tests.unit.test_report import MONTH, ledger

pytestmark = pytest.mark.integration

USED_BLUE = (0x26, 0x80, 0xC2)  # .used in the page's CSS
GRANTED_GREY = (0x9F, 0xB3, 0xC8)  # .granted
WIDTH, HEIGHT = 1400, 5000


def screenshot(page: Path, out: Path) -> Image.Image:
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is missing: `make setup` installs it"
    profile = out.parent / "chromium-profile"
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={WIDTH},{HEIGHT}",
        f"--screenshot={out}",
        page.as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.is_file(), result.stderr[-2000:]
    return Image.open(out).convert("RGB")


def test_the_report_page_renders_its_charts_and_tables(tmp_path: Path) -> None:
    page = tmp_path / f"gpuaas-report-{MONTH}.html"
    page.write_text(to_html(build_report(ledger(), MONTH)), encoding="ascii")
    image = screenshot(page, tmp_path / "report.png")
    assert image.size == (WIDTH, HEIGHT)
    colours = Counter(image.get_flattened_data())
    # The bars: three pools' tenant charts, the top tenants and three pools' days, granted and used.
    assert colours[USED_BLUE] > 20_000, colours.most_common(8)
    assert colours[GRANTED_GREY] > 20_000, colours.most_common(8)
    # Text and table borders: dark pixels in the top band, where the title and the totals are.
    top = image.crop((0, 0, WIDTH, 600))
    dark = sum(1 for pixel in top.get_flattened_data() if sum(pixel) < 200)
    assert dark > 2_000, "no text rendered at the top of the page"
    # The page is not a browser error page: most of it is the white background.
    assert colours[(255, 255, 255)] > WIDTH * HEIGHT // 2
