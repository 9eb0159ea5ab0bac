"""The Dagster UI as a user sees it, in headless Chromium: the graph, a patient's partitions, a mask's
picture, a check, and launching a run and a backfill from the UI. Everything asserted is read from the
rendered page; the daemon and webserver are real processes over a real instance (see conftest.py)."""

from __future__ import annotations

import re
import time

import pytest

from gcmlm_assets.pictures import MIN_DISPLAY_WIDTH
from gcmlm_assets_tests.support.ui.cockpit import SCREENSHOTS
from gcmlm_assets_tests.support.ui.onboarding import (
    COMMUNITY_NUX_KEY, COMMUNITY_NUX_SEEN, ONBOARDING_DIALOGS, dismiss_onboarding,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

GROUPS = {"radiology": ["ct_image", "segmentation_model", "ct_mask", "radiomics_row", "ct_mask_seg", "radiomics_sr"],
          "pathology": ["patch_coords", "uni_features", "slide_vector", "qupath_geojson"],
          "cohort": ["clinical_table", "fused_table", "risk_model", "risk_scores", "risk_assessments",
                     "risk_explanations"]}


def shown(page, text: str):
    """Elements showing exactly `text` that are visible (Dagster keeps hidden copies to measure names)."""
    return page.get_by_text(text, exact=True).filter(visible=True)


def wait_for_text(page, pattern: str, timeout_s: float, reload_every_s: float = 5.0) -> str:
    """Wait until the page's text matches `pattern`, reloading now and then; return the match."""
    deadline = time.monotonic() + timeout_s
    while True:
        match = re.search(pattern, page.inner_text("body"))
        if match:
            return match.group(0)
        assert time.monotonic() < deadline, f"{pattern!r} not shown on {page.url} within {timeout_s} s"
        page.wait_for_timeout(reload_every_s * 1000)
        page.reload()
        page.wait_for_load_state("networkidle")


def around(boxes: list[dict], margin: float) -> dict:
    """The rectangle holding every box, with a margin: a screenshot of just the graph's nodes."""
    left = min(b["x"] for b in boxes) - margin
    top = min(b["y"] for b in boxes) - margin
    right = max(b["x"] + b["width"] for b in boxes) + margin
    bottom = max(b["y"] + b["height"] for b in boxes) + margin
    return {"x": max(left, 0), "y": max(top, 0), "width": right - max(left, 0), "height": bottom - max(top, 0)}


def launch_from_materialize_dialog(page, partitions: list[str], button: str) -> str:
    """Materialize… → Custom partitions → tick `partitions` → `button`; return the toast's text."""
    page.get_by_role("button", name="Materialize…").first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("Select a partition or create one").click()
    for partition in partitions:
        shown(page, partition).last.click()
    page.keyboard.press("Escape")
    dialog.get_by_text(f"{len(partitions)} partition", exact=False).first.wait_for()
    page.get_by_role("button", name=button).click()
    toast = page.get_by_text(re.compile(r"^(Launched run|Created backfill) \w+"))
    toast.first.wait_for()
    return toast.first.inner_text()


def test_the_asset_graph_shows_the_three_groups_and_every_asset(ui):
    page = ui.open("/asset-groups")
    for group in GROUPS:
        shown(page, group).first.wait_for()
    # The graph's own settings button (the navigation's "Settings" link has the same icon).
    page.get_by_role("button", name="settings", exact=True).click()
    page.get_by_role("menuitem", name=re.compile("Expand all groups")).click()
    boxes = []
    for assets in GROUPS.values():
        for asset in assets:
            node = shown(page, asset).first
            node.wait_for()
            boxes.append(node.bounding_box())
    page.keyboard.press("Escape")  # closes the settings menu, which would cover the graph
    page.get_by_role("menuitem").first.wait_for(state="hidden")
    page.screenshot(path=str(SCREENSHOTS / "asset_graph.png"), clip=around(boxes, margin=60))


def test_a_failed_partition_shows_its_reason_within_two_clicks(ui, cockpit):
    cohort, _, _ = cockpit
    page = ui.open("/assets/ct_image?view=partitions")
    # GC9001's two timepoints are two partitions: the first materialized, the second failed alone.
    shown(page, "Failed (1)").first.wait_for()
    shown(page, "Materialized (3)").first.wait_for()
    shown(page, cohort.broken).first.wait_for()
    page.screenshot(path=str(SCREENSHOTS / "ct_image_timepoints.png"))
    # A materialized patient first (not one of the two clicks: it shows the other state).
    shown(page, cohort.ready[0]).first.click()
    page.get_by_text("Materialized", exact=True).filter(visible=True).first.wait_for()
    # Click 1: the failed patient; click 2: its run's logs, where the reason is.
    shown(page, cohort.broken).first.click()
    page.get_by_text(re.compile(r"Run \w+ failed, and did not materialize this asset")).wait_for()
    page.get_by_text("View logs").click()
    patient, timepoint = cohort.broken.split("@")
    reason = page.get_by_text(re.compile(rf"{patient}/ct/{timepoint}/ct\.nii\.gz: truncated")).first
    reason.wait_for()
    assert "upload it again" in reason.inner_text()


def test_a_ct_mask_materialization_shows_its_picture(ui, cockpit):
    cohort, _, _ = cockpit
    page = ui.open(f"/assets/ct_mask?view=partitions&partition={cohort.ready[0]}")
    page.get_by_text("[Show Markdown]").first.click()
    picture = page.get_by_role("dialog").locator("img").first
    picture.wait_for()
    page.wait_for_function("img => img.complete", arg=picture.element_handle())
    loaded_width, shown_width = picture.evaluate("img => [img.naturalWidth, img.getBoundingClientRect().width]")
    # Loaded, shown, and as wide as the UI's size rules make it (gcmlm_assets/pictures.py).
    assert loaded_width >= MIN_DISPLAY_WIDTH and shown_width > 0
    page.get_by_role("dialog").screenshot(path=str(SCREENSHOTS / "ct_mask_picture.png"))


def test_an_asset_check_result_and_its_description_are_visible(ui):
    page = ui.open("/assets/ct_mask?view=checks")
    shown(page, "mask_not_empty").first.click()
    page.get_by_text("This is a blocking asset check.").wait_for()
    # The description written in radiology/checks.py, rendered on the check's page.
    from gcmlm_assets.radiology.checks import CT_MASK_CHECK_SPECS

    [spec] = [spec for spec in CT_MASK_CHECK_SPECS if spec.name == "mask_not_empty"]
    page.get_by_text(spec.description.split("`")[0].strip()[:40], exact=False).first.wait_for()
    shown(page, "Passed").first.wait_for()


def test_descriptions_render_their_placeholders(ui):
    page = ui.open("/assets/ct_mask")
    placeholder = page.locator("code", has_text="<patient>").filter(visible=True)
    placeholder.first.wait_for()
    assert "<patient>" in placeholder.first.inner_text()


def test_launching_one_patients_radiomics_row_from_the_ui_succeeds(ui, cockpit):
    cohort, _, _ = cockpit
    page = ui.open("/assets/radiomics_row")
    toast = launch_from_materialize_dialog(page, [cohort.ready[1]], "Launch 1 run")
    assert re.match(r"Launched run \w+", toast)
    # The toast names the run by a short id; its View button opens the run's page.
    page.get_by_role("link", name="View", exact=True).filter(visible=True).last.click()
    page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"))
    wait_for_text(page, r"\bSuccess\b", timeout_s=300)
    shown(page, f"partition: {cohort.ready[1]}").first.wait_for()
    page.screenshot(path=str(SCREENSHOTS / "radiomics_row_run.png"))


def test_a_backfill_of_two_patients_slide_vector_from_the_ui_succeeds(ui, cockpit):
    cohort, _, _ = cockpit
    page = ui.open("/assets/slide_vector")
    toast = launch_from_materialize_dialog(page, list(cohort.ready), "Launch backfill")
    created = re.match(r"Created backfill (\w+)", toast)
    assert created, toast
    backfill_id = created.group(1)
    page = ui.open(f"/runs/b/{backfill_id}")
    wait_for_text(page, r"Status\s+Succeeded", timeout_s=400)
    for patient in cohort.ready:
        shown(page, patient).first.wait_for()
    page.screenshot(path=str(SCREENSHOTS / "slide_vector_backfill.png"))


def test_an_onboarding_dialog_that_opens_anyway_is_dismissed_before_the_next_click(browser, cockpit):
    """A page without the seeded key, whose instance is made to ask for the community dialog: the
    locator handler closes it, the click goes through, and the webapp records it seen exactly as
    onboarding.py seeds it."""
    _, server, _ = cockpit
    [title] = ONBOARDING_DIALOGS
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    try:
        page = context.new_page()
        page.set_default_timeout(30_000)

        def answer(route):
            # The instance's own answer would depend on earlier dismissals; this one always asks.
            operation = (route.request.post_data_json or {}).get("operationName")
            if operation == "ShouldShowNux":
                route.fulfill(json={"data": {"shouldShowNux": True}})
            elif operation == "SetNuxSeen":
                route.fulfill(json={"data": {"setNuxSeen": True}})
            else:
                route.fallback()

        page.route("**/graphql*", answer)
        dismissed = dismiss_onboarding(page)
        page.goto(server.url + "/asset-groups")
        page.wait_for_function(
            "title => [...document.querySelectorAll('[role=dialog]')].some(d => d.innerText.includes(title))",
            arg=title)
        # A click the open dialog would take: the graph's settings menu.
        page.get_by_role("button", name="settings", exact=True).click()
        page.get_by_role("menuitem", name=re.compile("Expand all groups")).wait_for()
        assert dismissed == [title]
        assert page.get_by_role("dialog").filter(has_text=title).count() == 0
        assert page.evaluate("key => window.localStorage.getItem(key)", COMMUNITY_NUX_KEY) == COMMUNITY_NUX_SEEN
    finally:
        context.close()
