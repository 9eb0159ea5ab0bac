"""The cohort tables (no Dagster): the clinical table, the fused table, the per-block arrays and
slide bags the models read, and the QC and soundness rules over them."""
