"""The risk model (no Dagster): its settings, blocks and fused model, fusion rules, ABMIL, training,
cross-validation, metrics and its file's bytes."""
