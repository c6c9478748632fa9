"""Write docs/playground.png: the playground on the embedded model, two settings answering side by side.

Needs Debian's chromium and the 'browser' extra (``make install``):

    python scripts/screenshot_playground.py [--out docs/playground.png]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright

from personalign.models import EMBEDDED_DEFAULT, load_model
from personalign.serve import create_app, running_server


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "docs" / "playground.png")
    ap.add_argument("--db", type=Path, default=Path("/tmp/personalign-screenshot.sqlite"))
    args = ap.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("needs Debian's chromium: apt-get install chromium")
    model, tok = load_model(EMBEDDED_DEFAULT, device="cpu", dtype="float32")
    with running_server(create_app(model, tok, EMBEDDED_DEFAULT, db=args.db)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/playground")
        page.wait_for_selector("#slider-2")
        page.fill("#words", "I'm a surgeon between operations: short, technical, no jokes")
        page.click("#read")
        page.wait_for_function("document.querySelector('#resolved').textContent.includes('P1B')")
        page.select_option("#method", "soup")
        page.select_option("#merge", "exact")
        page.fill("#question", "Why do leaves change colour in autumn?")
        page.fill("#max-tokens", "96")
        page.check("#compare")
        page.fill("#prefs-2", "1A,2B,3A")
        page.select_option("#method-2", "soup")
        page.click("#ask")
        for i in (1, 2):
            page.wait_for_function(f"document.querySelector('#meta-{i}').textContent.match(/stop|length/)",
                                   timeout=600_000)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out), full_page=True)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
