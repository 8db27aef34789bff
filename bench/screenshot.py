"""Full-page screenshots of HTML reports (``report.html``, ``oracle.html``, ...) in the system's
headless Chromium (Debian's ``chromium`` package, driven by Playwright; no browser download).

    python bench/screenshot.py runs/demo/report.html docs/img/demo-report.png [--width 1280]

It waits for every image to load and fails with one line when an image is broken or missing, so a
report whose figures did not render does not pass for a good one.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("page", help="an HTML file or an http(s) URL")
    ap.add_argument("out", help="the PNG to write")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=900)
    args = ap.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("screenshot.py: no system chromium; install it with `apt-get install chromium`", file=sys.stderr)
        return 2
    url = args.page
    if "://" not in url:
        path = Path(url).resolve()
        if not path.is_file():
            print(f"screenshot.py: {path} does not exist", file=sys.stderr)
            return 2
        url = path.as_uri()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.goto(url, wait_until="load")
        broken = page.evaluate("Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)"
                               ".map(i => i.getAttribute('src'))")
        images = page.evaluate("document.images.length")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    if broken:
        print(f"screenshot.py: {len(broken)} of {images} images did not load, e.g. {broken[0]}", file=sys.stderr)
        return 1
    print(f"{args.out}: {images} images, all loaded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
