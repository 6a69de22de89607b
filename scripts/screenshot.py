"""Regenerate docs/demo-report.png, the README's picture of `bequest demo`'s report: runs the demo into OUT
(resuming it, or reusing a finished one) and photographs OUT/report.html with headless Chromium.

    python scripts/screenshot.py [OUT]      (default OUT: bequest-demo, as the README's command writes)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PNG = ROOT / "docs" / "demo-report.png"
WINDOW = "1100,1500"  # the top of the report: the savings table, the stages and the first plot


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bequest-demo").resolve()
    if not (out / "report.html").is_file():
        subprocess.run(["bequest", "demo", str(out)], check=True)
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if browser is None:
        sys.exit("no chromium: apt-get install -y chromium")
    tmp = PNG.with_name(f".{PNG.name}.tmp.png")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={WINDOW}", "--virtual-time-budget=10000", f"--screenshot={tmp}",
                    (out / "report.html").as_uri()], check=True, capture_output=True)
    tmp.replace(PNG)
    print(f"wrote {PNG.relative_to(ROOT)} from {out / 'report.html'}")


if __name__ == "__main__":
    main()
