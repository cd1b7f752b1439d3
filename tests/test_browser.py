"""The browser helper can fail: each kind of broken page is reported, and a clean page reports nothing."""
from __future__ import annotations

import pytest

from tests.browser import artifact_dir, render, require_chromium

# A 1x1 GIF, and a data: URI that claims to be a PNG but is not one.
GOOD_IMG = "data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7"
BAD_IMG = "data:image/png;base64,iVBORw0KGgoAAAAbroken"

BROKEN_PAGES = {
    "js_error": ("<p>x</p><script>notDefinedAnywhere();</script>", "notDefinedAnywhere"),
    "broken_image": (f'<img src="{BAD_IMG}">', "image did not decode"),
    "missing_file": ('<img src="missing.png">', "missing.png"),
}


def page(body: str) -> str:
    """A minimal HTML document around `body`."""
    return f'<!doctype html><html><head><meta charset="utf-8"><title>t</title></head><body>{body}</body></html>'


@pytest.fixture(autouse=True)
def _chromium():
    """Skip every test here, with the reason, where there is no browser."""
    require_chromium()


@pytest.mark.parametrize("name", sorted(BROKEN_PAGES))
def test_broken_page_is_reported(tmp_path, name):
    body, expected = BROKEN_PAGES[name]
    html = tmp_path / f"{name}.html"
    html.write_text(page(body), encoding="utf-8")
    problems = render(html, artifact_dir() / f"browser-{name}.png")
    assert any(expected in p for p in problems), problems


def test_clean_page_reports_nothing_and_saves_screenshot(tmp_path):
    html = tmp_path / "clean.html"
    html.write_text(page(f'<h1>Report</h1><img src="{GOOD_IMG}" width="40" height="40">'), encoding="utf-8")
    shot = artifact_dir() / "browser-clean.png"
    shot.unlink(missing_ok=True)
    assert render(html, shot) == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 100
