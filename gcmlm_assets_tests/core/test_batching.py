"""LoadOnce: a step's model is loaded once per key, and a load that failed is not tried again for
every patient of the run."""

from __future__ import annotations

import pytest

from gcmlm_assets.batching import LoadOnce, StepFailure


class UnusableModel(ValueError):
    pass


def test_a_model_loads_once_per_key_and_a_failed_load_is_not_repeated():
    calls: list[str] = []

    def load(folder: str) -> str:
        calls.append(folder)
        if folder == "tampered":
            raise UnusableModel(f"{folder}: checkpoint digest differs")
        return f"model of {folder}"

    model = LoadOnce(load, errors=(UnusableModel,))
    assert model.get("a") == model.get("a") == "model of a"
    for _ in range(3):  # three patients of one run asking for the same broken model
        with pytest.raises(StepFailure, match="tampered: checkpoint digest differs"):
            model.get("tampered")
    assert model.get("b") == "model of b"
    assert calls == ["a", "tampered", "b"] and model.loads == 2
