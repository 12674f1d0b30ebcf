"""JanusFlow in the playground, in a real headless Chromium against `janus-server serve` of the tiny JanusFlow
checkpoint."""

from __future__ import annotations

from tests.support.browser import console_problems, require_browser, start_chromium, wait_for


def test_playground_shows_steps_and_no_temperature(flow_server):
    """JanusFlow in the playground: ODE steps to set, no temperature (it samples no tokens)."""
    require_browser()
    driver = start_chromium()
    try:
        driver.get(flow_server.url + "/")
        wait_for(lambda: driver.find_element("id", "model").get_attribute("data-ready"), 30, "the model name")
        wait_for(lambda: driver.find_element("id", "gen-steps-label").is_displayed(), 10, "the Steps field")
        assert not driver.find_element("id", "gen-temperature-label").is_displayed()
        assert console_problems(driver) == []
    finally:
        driver.quit()
