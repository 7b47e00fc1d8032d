"""Take the store browser's screenshots in docs/ (a real `logitstore view` in headless Chromium).

    python examples/viewer_screenshots.py STORE_T1 STORE_T07 --out docs/

STORE_T1 and STORE_T07 are two stores over the same text (docs/ shows the shipped teacher,
examples/teacher, over held-out standard-library files at temperature 1 and 0.7). Needs
Debian's chromium (`bash .ci/setup` installs it) and Playwright (the dev extra).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store", help="the store to view")
    ap.add_argument("other", help="a store over the same text, to compare with")
    ap.add_argument("--out", default="docs", help="folder for the PNGs (default docs)")
    ap.add_argument("--sequence", type=int, default=3, help="sequence to show (default 3)")
    chromium = os.environ.get("LOGITSTORE_CHROMIUM", "/usr/bin/chromium")
    ap.add_argument("--chromium", default=chromium, help=f"the browser (default {chromium})")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    cmd = [sys.executable, "-m", "logitstore", "view", args.store, "--compare", args.other]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split()[-1]
        base = url.split("#")[0]
        for _ in range(300):
            try:
                urllib.request.urlopen(base.rsplit("/v1/", 1)[0] + "/v1/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        out = Path(args.out)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium)
            page = browser.new_page(viewport={"width": 1400, "height": 820})
            page.goto(f"{base}#seq={args.sequence}&measure=entropy")
            page.wait_for_selector("body[data-ready='1']")
            page.wait_for_selector("#hists svg")
            tokens = page.locator("#tokens .tok")
            tokens.nth(40).click()
            page.wait_for_selector("#candidates .cand")
            page.screenshot(path=str(out / "viewer.png"))
            print(f"wrote {out / 'viewer.png'}")
            page.locator("#info-box").screenshot(path=str(out / "viewer-info.png"))
            print(f"wrote {out / 'viewer-info.png'}")
            page = browser.new_page(viewport={"width": 1400, "height": 820})
            page.goto(f"{base}#seq={args.sequence}&compare={Path(args.other).name}")
            page.wait_for_selector("body[data-ready='1']")
            page.locator("#tokens .tok").nth(40).click()
            page.wait_for_selector("#candidates .columns")
            page.screenshot(path=str(out / "viewer-compare.png"))
            print(f"wrote {out / 'viewer-compare.png'}")
            browser.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
