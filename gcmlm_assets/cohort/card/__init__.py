"""The risk model's report (no Dagster): the model card, the context it is written from, its plots."""
