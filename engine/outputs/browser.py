"""The report in headless Chromium: a rendering check and a screenshot of each section."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

from engine.outputs.report import SECTIONS

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking")


def find_chromium() -> str:
    """The Chromium executable (``chromium``, ``chromium-browser`` or ``google-chrome``)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError("no Chromium found (apt-get install chromium)")


def browser_check(report: str | Path, chromium: str | None = None) -> tuple[int, int]:
    """Open the report in headless Chromium; return (images decoded, images on the page)."""
    result = subprocess.run([chromium or find_chromium(), *CHROMIUM_FLAGS, "--virtual-time-budget=10000",
                             "--dump-dom", Path(report).resolve().as_uri()],
                            capture_output=True, text=True, timeout=120)
    match = re.search(r'<body[^>]*data-images-loaded="(\d+)"[^>]*data-images-total="(\d+)"', result.stdout)
    if match is None:
        raise RuntimeError(f"Chromium did not render {report}: {result.stderr[-1000:]}")
    return int(match.group(1)), int(match.group(2))


def screenshot_sections(report: str | Path, out_dir: str | Path, chromium: str | None = None,
                        width: int = 1320, height: int = 16000) -> dict[str, Path]:
    """A PNG screenshot of each section the report has (``<out_dir>/<section>.png``), trailing blank space cut
    off."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shots = {}
    page = Path(report).read_text(encoding="utf-8")
    for section in (section for section in SECTIONS if f'<section id="{section}">' in page):
        path = out_dir / f"{section}.png"
        result = subprocess.run([chromium or find_chromium(), *CHROMIUM_FLAGS, "--hide-scrollbars",
                                 f"--window-size={width},{height}", f"--screenshot={path}",
                                 f"{Path(report).resolve().as_uri()}?section={section}"],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0 or not path.is_file():
            raise RuntimeError(f"Chromium could not screenshot {report} section {section}: {result.stderr[-1000:]}")
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"))
            used = np.flatnonzero((pixels != pixels[-1, -1]).any(axis=1))
            bottom = min(pixels.shape[0], int(used[-1]) + 20) if used.size else pixels.shape[0]
            cropped = image.crop((0, 0, image.width, bottom))
        cropped.save(path, optimize=True)
        shots[section] = path
    return shots
