"""One sensor tick through the daemon's own code, for the scale benchmark.

The workspace is workspace.yaml's module (`gcmlm_assets.definitions`) in a code server process
that Dagster starts (`WorkspaceProcessContext`, as `dagster-daemon` does). The tick is evaluated by
that code server (`CodeLocation.get_sensor_execution_data`) and its run requests are turned into
queued runs by the sensor daemon's own function (`dagster._daemon.sensor.
_handle_run_requests_and_automation_condition_evaluations`: for each request it reloads the code
location, asks the code server for the job and its execution plan, creates the run and submits it
to the instance's run coordinator). Dagster has no public API for either half; both are 1.13's.
"""

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

PROJECT_ROOT = Path(__file__).resolve().parents[1]
LOCATION = "gcmlm_assets"


@dataclass
class DaemonTick:
    requested: int = 0
    evaluation_s: float = 0.0
    created: int = 0
    creation_s: float = 0.0
    run_ids: list[str] = field(default_factory=list)
    problem: str = ""  # why nothing was measured

    @property
    def per_run_s(self) -> float:
        return self.creation_s / self.created if self.created else 0.0


def tick_through_the_daemon(instance: dg.DagsterInstance, sensor_name: str, cursor: str | None,
                            limit: int) -> DaemonTick:
    """Evaluate `sensor_name` from `cursor` in a code server and create the tick's first `limit`
    runs as the daemon does (they are queued, not launched: no run coordinator daemon runs here)."""
    from dagster._core.definitions.run_request import InstigatorType
    from dagster._core.scheduler.instigation import (
        InstigatorState, InstigatorStatus, SensorInstigatorData, TickData, TickStatus)
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import ModuleTarget
    from dagster._daemon.sensor import SensorLaunchContext, _handle_run_requests_and_automation_condition_evaluations

    target = ModuleTarget(module_name="gcmlm_assets.definitions", attribute=None,
                          working_directory=str(PROJECT_ROOT), location_name=LOCATION)
    result = DaemonTick()
    logger = logging.getLogger("scale.sensor_daemon")
    with WorkspaceProcessContext(instance, target) as process_context:
        workspace = process_context.create_request_context()
        location = workspace.get_code_location(LOCATION)
        repository = next(iter(location.get_repositories().values()))
        sensor = repository.get_sensor(sensor_name)
        state = instance.get_instigator_state(sensor.get_remote_origin_id(), sensor.selector_id)
        data = SensorInstigatorData(cursor=cursor, sensor_type=sensor.sensor_type)
        if state is None:
            instance.add_instigator_state(InstigatorState(sensor.get_remote_origin(), InstigatorType.SENSOR,
                                                          InstigatorStatus.RUNNING, data))
        else:
            instance.update_instigator_state(state.with_data(data))
        tick = instance.create_tick(TickData(
            instigator_origin_id=sensor.get_remote_origin_id(), instigator_name=sensor_name,
            instigator_type=InstigatorType.SENSOR, status=TickStatus.STARTED, timestamp=time.time(),
            selector_id=sensor.selector_id))
        with SensorLaunchContext(sensor, tick, instance, logger, {}) as context:
            started = time.perf_counter()
            evaluated = location.get_sensor_execution_data(instance, repository.handle, sensor_name, None, None,
                                                           cursor, context.log_key, None)
            result.evaluation_s = time.perf_counter() - started
            requests = list(evaluated.run_requests or [])
            result.requested = len(requests)
            if not requests:
                result.problem = f"the tick requested no run ({evaluated.skip_message or 'no reason given'})"
                context.update_state(TickStatus.SKIPPED, cursor=evaluated.cursor)
                return result
            started = time.perf_counter()
            errors = [error for error in _handle_run_requests_and_automation_condition_evaluations(
                raw_run_requests=requests[:limit], automation_condition_evaluations=[], cursor=evaluated.cursor,
                instance=instance, context=context, remote_sensor=sensor,
                workspace_process_context=process_context, submit_threadpool_executor=None) if error]
            result.creation_s = time.perf_counter() - started
            result.run_ids = [run_id for run_id in context.tick.run_ids]
            result.created = len(result.run_ids)
            context.update_state(TickStatus.SUCCESS, cursor=evaluated.cursor)
            if errors:
                result.problem = f"{len(errors)} request(s) failed: {errors[0].message.strip()[:200]}"
    return result
