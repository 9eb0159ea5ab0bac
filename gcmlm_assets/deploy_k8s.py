"""Kubernetes execution (GCMLM_ENV=k8s): every step runs as a Kubernetes job.

Pod settings (images, GPU requests, volumes) are filled in by the deployment
work; here the executor is built so that the k8s definitions load and validate.
"""

from __future__ import annotations

import dagster as dg
from dagster_k8s import k8s_job_executor


def k8s_executor() -> dg.ExecutorDefinition:
    return k8s_job_executor.configured({"max_concurrent": 16})
