"""docs/dashboard.png: the dashboard of a real federation (a director, three envoys on the CIFAR-10 subset)
after a finished eight-round FedAvg experiment (``--dp``: DP-FedAvg, whose noise on three envoys makes the
curves noisy), shot in headless chromium.

    .venv/bin/python scripts/dashboard_screenshot.py [--out docs/dashboard.png] [--rounds 8] [--dp]

Needs the dashboard extra, selenium and Debian's chromium and chromium-driver. Every process it starts is
stopped on the way out.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "dashboard")]

from dashboard_helpers import browser_missing, chromium, dashboard, submit  # noqa: E402
from processes import Stack  # noqa: E402

from fedjax_core.privacy import CentralDP  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "dashboard.png"))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--dp", action="store_true", help="CentralDP(noise_multiplier=0.3): the epsilon chart too")
    args = parser.parse_args()
    if why := browser_missing():
        print(f"cannot take the screenshot: {why}", file=sys.stderr)
        return 2
    from selenium.webdriver.support.ui import WebDriverWait

    with tempfile.TemporaryDirectory(prefix="dashboard-shot-") as tmp:
        stack = Stack(Path(tmp), n_envoys=3)
        try:
            stack.start()
            fed = stack.federation()
            try:
                privacy = CentralDP(noise_multiplier=0.3, clipping_norm=1.0, delta=1e-5) if args.dp else None
                submit(fed, "cifar10_linear_dp" if args.dp else "cifar10_linear", rounds=args.rounds, gate=None,
                       limit=1024, privacy=privacy)
            finally:
                fed.close()
            with dashboard(stack.port) as address, chromium(width=1500, height=1200) as driver:
                driver.get(address)
                WebDriverWait(driver, 300, poll_frequency=0.2).until(
                    lambda d: d.find_element("id", "experiment-summary").text.startswith("finished"),
                    "the experiment to finish")
                WebDriverWait(driver, 10).until(  # the last frames drawn
                    lambda d: d.execute_script("return document.querySelectorAll('#charts .main-svg').length") > 0)
                height = driver.execute_script("return document.documentElement.scrollHeight")
                driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",  # the whole page in one shot
                                       {"width": 1500, "height": height, "deviceScaleFactor": 1, "mobile": False})
                driver.execute_script("return new Promise((done) => setTimeout(done, 500))")  # the resize redraw
                driver.save_screenshot(args.out)
        except BaseException:
            print(stack.logs(), file=sys.stderr)
            raise
        finally:
            stack.stop()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
