"""The names onboarding.py relies on are the ones the bundled Dagster webapp reads: an upgrade of
dagster-webserver that renames them fails here, not as a dialog over a random browser test."""

from __future__ import annotations

from pathlib import Path

from gcmlm_assets_tests.support.ui.onboarding import COMMUNITY_NUX_KEY, ONBOARDING_DIALOGS


def _webapp_scripts() -> list[Path]:
    import dagster_webserver

    build = Path(dagster_webserver.__file__).parent / "webapp" / "build"
    scripts = sorted(build.rglob("*.js"))
    assert scripts, f"no JavaScript under {build}"
    return scripts


def test_the_webapp_gates_its_community_dialog_on_the_seeded_key():
    [title] = ONBOARDING_DIALOGS
    holding = [path for path in _webapp_scripts() if title in path.read_text(encoding="utf-8", errors="replace")]
    assert len(holding) == 1, f"{title!r} is in {len(holding)} webapp scripts: {holding}"
    script = holding[0].read_text(encoding="utf-8", errors="replace")
    # The component reads its "seen" flag from local storage under this key, and the instance's flag too.
    assert f'"{COMMUNITY_NUX_KEY}"' in script
    assert "shouldShowNux" in script and "setNuxSeen" in script
    assert f'children:"{ONBOARDING_DIALOGS[title]}"' in script
