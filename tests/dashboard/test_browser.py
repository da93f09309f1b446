"""The dashboard in a real headless browser against a real director, two envoys and a running experiment:
the page lists the envoys, and a round's curve gains a point when the round closes, without reloading."""
from __future__ import annotations

import pytest

pytest.importorskip("starlette", reason="the dashboard extra (starlette, uvicorn, plotly) is not installed")

from dashboard_helpers import (browser_missing, chromium, dashboard, points, severe_logs, submit,  # noqa: E402
                               table_text, trace_names)

WAIT_S = 60.0


@pytest.mark.skipif(bool(browser_missing()), reason=browser_missing() or "a browser is present")
def test_the_page_lists_the_envoys_and_a_curve_gains_a_point_when_a_round_closes(stack, tmp_path):
    """``stack`` (tests/conftest.py): a director and two envoys on loopback."""
    from selenium.webdriver.support.ui import WebDriverWait

    gate = tmp_path / "gates"
    gate.mkdir()
    (gate / "0").touch()  # round 0 may train; round 1 waits for the test
    with dashboard(stack.port) as address, chromium() as driver:
        wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.1)
        driver.get(address)
        wait.until(lambda d: table_text(d, "envoys").count("online") == 2, "the two envoys listed online")
        envoys = table_text(driver, "envoys")
        assert "env1" in envoys and "env2" in envoys and "2585" in envoys  # each shard's train size
        assert driver.execute_script("return document.getElementById('labels').data.length") == 2  # histograms

        fed = stack.federation()
        try:
            submit(fed, "dashboard_live", rounds=2, gate=gate)
        finally:
            fed.close()
        # the page follows the running experiment by itself; round 0 closes and its round time is drawn
        wait.until(lambda d: d.find_element("id", "experiment-title").text == "dashboard_live", "the experiment")
        wait.until(lambda d: points(d, "round/time_s") == 1, "round 0's point")
        assert sorted(trace_names(driver, "aggregated_model_validation/accuracy")) == ["aggregate", "env1", "env2"]
        assert sorted(trace_names(driver, "round/bytes")) == ["received (updates)", "sent (models)"]
        assert points(driver, "round/time_s") == 1  # round 1 is held at its gate: no second point yet

        driver.execute_script("window.notReloaded = true;")
        (gate / "1").touch()  # round 1 trains and closes: the same page, not reloaded, gains the point
        wait.until(lambda d: points(d, "round/time_s") == 2, "round 1's point")
        assert driver.execute_script("return window.notReloaded === true;")
        wait.until(lambda d: "finished" in d.find_element("id", "experiment-summary").text, "the experiment's end")
        wait.until(lambda d: points(d, "aggregated_model_validation/accuracy", "aggregate") == 3,
                   "the final model's validation")  # rounds 0, 1 and the final one
        rounds = table_text(driver, "rounds")
        assert "env1, env2" in rounds and "MB" in rounds
        assert severe_logs(driver) == []  # no script error, no refusal by the page's Content-Security-Policy
