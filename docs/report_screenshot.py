"""Regenerate docs/report_demo.png, the README's picture of ``omh-ref report``: the page that
``omh-ref demo`` (default settings) ends with, ``runs/demo/report.html``, rendered by headless
Chromium (Debian's ``chromium``, driven as the browser test drives it: tests/browser.py) at 1280 px
wide, the whole page, scaled to 60 % and quantised to 256 colours to keep the file small.

    python docs/report_screenshot.py [--demo runs/demo] [--out docs/report_demo.png]

It runs ``omh-ref demo --out DEMO`` first when DEMO holds no report.html (5-8 minutes on 2 cores);
it needs the ``report`` and ``test`` extras and Chromium. The committed picture is of a shorter demo,
``omh-ref demo --out DEMO --seeds 0,1 --steps 120 --n-train 200 --n-val 60`` (12 minutes on a busy
2-core machine), then ``python docs/report_screenshot.py --demo DEMO``.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", default=str(REPO / "runs" / "demo"), help="The demo's folder.")
    ap.add_argument("--out", default=str(REPO / "docs" / "report_demo.png"))
    ap.add_argument("--scale", type=float, default=0.6)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from tests import browser

    why = browser.missing()
    if why:
        print(f"cannot take the screenshot: {why}", file=sys.stderr)
        return 1
    page = Path(args.demo) / "report.html"
    if not page.is_file():
        subprocess.run([sys.executable, "-m", "omh_ref_cli.main", "demo", "--out", args.demo, "--quiet"], check=True)
    with tempfile.TemporaryDirectory() as tmp, browser.Browser(width=1280, height=900) as b:
        b.open(page.resolve().as_uri())
        if b.errors:
            print(f"the page reported errors: {b.errors}", file=sys.stderr)
            return 1
        shot = Path(tmp) / "full.png"
        b.screenshot(shot)
        with Image.open(shot) as im:
            w, h = im.size
            small = im.convert("RGB").resize((round(w * args.scale), round(h * args.scale)), Image.LANCZOS)
        small.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size // 1024} KiB, {small.size[0]}x{small.size[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
