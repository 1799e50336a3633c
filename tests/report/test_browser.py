"""report.html in a real browser: headless Chromium renders it offline, with its figures."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

PIL = pytest.importorskip("PIL.Image", reason="Pillow (a matplotlib dependency) is needed to read the screenshot")

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
WIDTH, HEIGHT, BAND = 1280, 4000, 250


@pytest.mark.skipif(BROWSER is None, reason="Chromium is not installed (apt-get install -y chromium); the real-browser check of report.html is skipped")
def test_report_renders_with_its_figures_in_headless_chromium(written_report, tmp_path):
    shot = tmp_path / "report.png"
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}",
           written_report["html"].resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    image = PIL.open(shot).convert("RGB")
    assert image.size == (WIDTH, HEIGHT)
    assert len(image.getcolors(1 << 24)) > 2000, "the page looks blank"
    # Figures are where the page has many distinct saturated colours (text is grey on white, the
    # table's highlight one flat green): count such bands of the page.
    rgb = np.asarray(image, dtype=np.uint32)
    hsv = np.asarray(image.convert("HSV"))
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    saturated = (hsv[..., 1] > 60) & (hsv[..., 2] > 40)
    rich = sum(len(np.unique(packed[top:top + BAND][saturated[top:top + BAND]])) > 300 for top in range(0, HEIGHT, BAND))
    assert rich >= 4, f"only {rich} regions of the screenshot hold figures; are the inline PNGs shown?"
