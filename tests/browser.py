"""Open a self-contained HTML page (e.g. `ns-data report` output) in headless chromium and list what went wrong.

Playwright drives the chromium already on this machine (`executable_path`); it never downloads a browser.
Tests call `require_chromium()` first, so they skip with a clear reason where there is no browser.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# After `load`: make lazy images load, wait for each to decode, and name those that did not (naturalWidth == 0).
_BROKEN_IMAGES_JS = """async () => {
  const imgs = Array.from(document.images);
  imgs.forEach(img => { img.loading = 'eager'; });
  await Promise.all(imgs.map(img => img.decode().catch(() => null)));
  return imgs.filter(img => img.naturalWidth === 0).map(img => (img.currentSrc || img.src || '(no src)').slice(0, 80));
}"""


def find_chromium() -> str | None:
    """Path of the chromium binary: $NS_DATA_CHROMIUM if set, else the first of the usual names on PATH."""
    if os.environ.get("NS_DATA_CHROMIUM"):
        return os.environ["NS_DATA_CHROMIUM"]
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def require_chromium() -> str:
    """The chromium path, or skip the calling test with the reason (no browser, or no Playwright package)."""
    exe = find_chromium()
    if exe is None:
        pytest.skip("chromium not installed: no chromium on PATH (`make test` installs it with apt-get as root)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright not installed: pip install -c constraints.txt -e '.[test]'")
    return exe


def artifact_dir() -> Path:
    """Where tests keep screenshots: $NS_DATA_TEST_ARTIFACTS, else test-artifacts/ at the repo root (created)."""
    path = Path(os.environ.get("NS_DATA_TEST_ARTIFACTS") or REPO_ROOT / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def render(html_path, screenshot_path, timeout_ms: int = 30_000) -> list[str]:
    """Open `html_path` offline, wait for load, save a full-page PNG at `screenshot_path`; return every problem.

    Problems: console errors, uncaught page errors, failed requests, any request that leaves the machine
    (the page must be self-contained), and images that did not decode. An empty list means a clean page.
    """
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    url = Path(html_path).resolve().as_uri()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=require_chromium(), args=["--disable-dev-shm-usage"])
        try:
            page = browser.new_context(offline=True).new_page()
            page.set_default_timeout(timeout_ms)
            page.on("console", lambda m: m.type == "error" and problems.append(f"console error: {m.text}"))
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url[:200]} ({r.failure})"))
            page.on("request", lambda r: r.url.split(":", 1)[0] not in ("file", "data", "blob", "about")
                    and problems.append(f"external request: {r.url[:200]}"))
            page.goto(url, wait_until="load")
            problems += [f"image did not decode: {src}" for src in page.evaluate(_BROKEN_IMAGES_JS)]
            Path(screenshot_path).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot_path), full_page=True)
        finally:
            browser.close()
    return problems
