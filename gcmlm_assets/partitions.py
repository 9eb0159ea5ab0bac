"""The one patient partition set; every per-patient asset uses it."""

import dagster as dg

patients_partitions = dg.DynamicPartitionsDefinition(name="patients")
