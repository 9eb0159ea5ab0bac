"""Dagster's onboarding pop-ups, kept off the browser tests' pages.

The webapp of dagster-webserver 1.13 (its `CommunityNux` component) opens a "Join the Dagster
community" dialog one second after a page of a 127.0.0.1 or localhost origin loads, unless the
page's localStorage holds a truthy JSON value under `communityNux` or the instance records that
someone dismissed it (`$DAGSTER_HOME/.nux/nux.yaml`). Each browser context starts with empty
storage, so without help the dialog comes back on every test's page, over whatever is clicked.

Two guards, neither of which races the dialog's timer:
- `suppress_onboarding` seeds the key the webapp reads before any script of a page runs;
- `dismiss_onboarding` registers a Playwright locator handler that presses the dialog's own
  dismiss button whenever one appears anyway, before the next action or assertion proceeds.
test_onboarding.py checks that the bundled webapp still reads these names.
"""

from __future__ import annotations

import json

# The localStorage key and the value the webapp itself stores when the dialog is dismissed.
COMMUNITY_NUX_KEY = "communityNux"
COMMUNITY_NUX_SEEN = json.dumps("1")
# Onboarding dialogs: the text that identifies each, and the button that dismisses it.
ONBOARDING_DIALOGS = {"Join the Dagster community": "Skip"}

SEED_SCRIPT = (
    # about:blank and other opaque origins have no localStorage; there is nothing to seed there.
    f"try {{ window.localStorage.setItem({json.dumps(COMMUNITY_NUX_KEY)}, {json.dumps(COMMUNITY_NUX_SEEN)}); }}"
    " catch (error) {}"
)


def suppress_onboarding(context) -> None:
    """Mark the onboarding dialog seen in every page `context` opens, before the page's own scripts run."""
    context.add_init_script(script=SEED_SCRIPT)


def dismiss_onboarding(page) -> list[str]:
    """Close any onboarding dialog that opens on `page` before Playwright's next action or check.

    Returns the list the handlers append each dismissed dialog's title to.
    """
    dismissed: list[str] = []
    for title, button in ONBOARDING_DIALOGS.items():
        dialog = page.get_by_role("dialog").filter(has_text=title)

        def close(found, title=title, button=button) -> None:
            found.get_by_role("button", name=button, exact=True).click()
            dismissed.append(title)

        page.add_locator_handler(dialog, close)
    return dismissed
