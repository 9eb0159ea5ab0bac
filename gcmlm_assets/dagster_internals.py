"""The one place gcmlm_assets reaches into Dagster's private modules (`dagster._...`).

Checked against Dagster 1.13.27. None of these names is exported by `dagster` itself, and each may
move in a Dagster release: after an upgrade, this module's import is what breaks, and only here.
(`AssetPartitionStatus` used to be imported from a private module too; it is public as
`dg.AssetPartitionStatus`, so it is taken from there.)

- `AssetCheckEvaluationTargetMaterializationData`: the materialization (run id, storage id) a check
  evaluation checked. `dg.AssetCheckEvaluation(target_materialization_data=...)` needs it to store
  a patient's check result against that patient's materialization (see batching.py).
- `AssetCheckExecutionRecordStatus`: the status of a stored check execution (planned, succeeded,
  failed...), which `instance.event_log_storage.get_asset_check_execution_history` filters on and
  `get_asset_check_partition_info` reports.
- `PartitionKeyFilter`: the partition argument of that history query (a patient, or None for the
  evaluations Dagster stores without a partition).
- Tag names Dagster writes on runs and materializations and reads back: the data and code version
  of a materialization, the partition (or partition range) of a run, its backfill, run key and
  sensor. Taken from Dagster rather than restated as strings, so that they cannot drift.
"""

from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData as AssetCheckEvaluationTargetMaterializationData)
from dagster._core.definitions.data_version import (
    CODE_VERSION_TAG as CODE_VERSION_TAG,
    DATA_VERSION_IS_USER_PROVIDED_TAG as DATA_VERSION_IS_USER_PROVIDED_TAG,
    DATA_VERSION_TAG as DATA_VERSION_TAG)
from dagster._core.event_api import PartitionKeyFilter as PartitionKeyFilter
from dagster._core.storage.asset_check_execution_record import (
    AssetCheckExecutionRecordStatus as AssetCheckExecutionRecordStatus)
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG as ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG as ASSET_PARTITION_RANGE_START_TAG,
    BACKFILL_ID_TAG as BACKFILL_ID_TAG,
    PARTITION_NAME_TAG as PARTITION_NAME_TAG,
    RUN_KEY_TAG as RUN_KEY_TAG,
    SENSOR_NAME_TAG as SENSOR_NAME_TAG)
