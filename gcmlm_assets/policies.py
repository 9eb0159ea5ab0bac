"""How every asset's step reacts to failure: one policy for the whole platform.

A transient failure (an I/O error, a step process killed for memory) is retried twice, 10 s
then 20 s later. Input errors raise `dagster.Failure(allow_retries=False)` and so fail once, with
their reason. A run whose own process dies is re-executed by the instance's run retries (see
`deploy/*/dagster.yaml`), which leave step failures to this policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import dagster as dg

if TYPE_CHECKING:
    from gcmlm_assets.reuse import StoredOutput

# The metadata entry of a materialization whose output a failed blocking check moved into quarantine.
QUARANTINED_TO = "quarantined_to"
TRANSIENT_RETRY = dg.RetryPolicy(max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL)


def _quarantine_on_blocking_failure(store, asset: str, patient_id: str, result: dg.MaterializeResult,
                                   specs: list[dg.AssetCheckSpec],
                                   separate_results: list[dg.AssetCheckResult] = ()) -> dg.MaterializeResult:
    """The materialization, its output moved into quarantine when a blocking check failed.

    `separate_results` are check results yielded beside the materialization rather than inside it.
    The metadata then says where the output went (`quarantined_to`) and which checks failed.
    """
    from gcmlm_assets.quarantine import blocking_failures, quarantine_output

    results = [*(result.check_results or []), *separate_results]
    failed = blocking_failures(results, [spec.name for spec in specs if spec.blocking])
    if not failed:
        return result
    moved = quarantine_output(store, asset, patient_id, failed)
    metadata = {**(result.metadata or {}), QUARANTINED_TO: dg.MetadataValue.path(str(moved)),
                "failed_blocking_checks": ", ".join(failed)}
    return dg.MaterializeResult(asset_key=result.asset_key, metadata=metadata, check_results=result.check_results,
                                data_version=result.data_version, tags=result.tags)


def stored_materialization(output: StoredOutput, metadata: dict, data_version: str, *,
                           check_results: list[dg.AssetCheckResult] | None = None,
                           specs: list[dg.AssetCheckSpec] = (),
                           separate_results: list[dg.AssetCheckResult] = ()) -> dg.MaterializeResult:
    """The materialization of a stored output (reuse.py): its metadata, data version (a file's
    sha256, see `StoredOutput.sha256`) and check results, the output quarantined when one of the
    blocking checks among `specs` failed."""
    result = dg.MaterializeResult(asset_key=output.asset.key, metadata=metadata, check_results=check_results,
                                  data_version=dg.DataVersion(data_version))
    if not specs:
        return result
    return _quarantine_on_blocking_failure(output.store, output.asset.key, output.patient_id, result, specs,
                                          separate_results)
