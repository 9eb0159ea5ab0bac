"""torch.compile is off in every pod: nnU-Net's own switch, set wherever pods get their environment.

nnU-Net 2.8 compiles its network on CUDA unless `nnUNet_compile` says otherwise, and compiling
(triton) needs a C compiler and Python.h, which the image's final stage does not have. The image,
the code location's env and the run launcher's envVars (which reach the run and step pods) all set
it; nnU-Net's decision function, given that value on a CUDA device, says "do not compile".
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import yaml

from gcmlm_assets_tests.support.deploy.dockerfile import DOCKERFILE, env_of, parse_dockerfile, stages

REPO = Path(__file__).resolve().parents[2]
SWITCH = "nnUNet_compile"


@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load((REPO / "deploy" / "helm" / "values.yaml").read_text(encoding="utf-8"))


def settings_everywhere(values: dict) -> dict[str, str | None]:
    """The switch's value in each place a pod of our image gets its environment from."""
    deployment = values["dagster-user-deployments"]["deployments"][0]
    launcher = dict(item.split("=", 1) for item in values["runLauncher"]["config"]["k8sRunLauncher"]["envVars"])
    image = env_of(stages(parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8")))[-1])
    return {"the image (Dockerfile's final stage)": image.get(SWITCH),
            "the code location's env (values.yaml)": deployment["env"].get(SWITCH),
            "the run launcher's envVars (values.yaml)": launcher.get(SWITCH)}


def nnunet_would_compile(monkeypatch, value: str | None) -> bool:
    """nnU-Net's own decision (nnUNetTrainer._do_i_compile) on a CUDA device, with the switch at `value`.

    A trainer needs a plans file, a dataset and a GPU to be built; the decision reads only the
    trainer's device and the environment, so it is called on an object holding a CUDA device.
    """
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    if value is None:
        monkeypatch.delenv(SWITCH, raising=False)
    else:
        monkeypatch.setenv(SWITCH, value)
    trainer_on_cuda = types.SimpleNamespace(device=torch.device("cuda", 0), print_to_log_file=print)
    return nnUNetTrainer._do_i_compile(trainer_on_cuda)  # noqa: SLF001 (nnU-Net's decision itself)


def test_every_pod_environment_turns_compile_off(values, monkeypatch):
    found = settings_everywhere(values)
    values_seen = set(found.values())
    assert len(values_seen) == 1 and None not in values_seen, f"{SWITCH} differs or is missing: {found}"
    (value,) = values_seen
    assert nnunet_would_compile(monkeypatch, value) is False, f"nnU-Net compiles with {SWITCH}={value!r}"


def test_nnunet_would_compile_on_cuda_without_the_switch(monkeypatch):
    """Why it is set: nnU-Net's default on CUDA is to compile, and "true" keeps it on."""
    assert nnunet_would_compile(monkeypatch, None) is True
    assert nnunet_would_compile(monkeypatch, "true") is True
