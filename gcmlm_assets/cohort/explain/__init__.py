"""Why a score is what it is (no Dagster): exact per-patient contributions, global permutation
importance, and which patients need a new explanation."""
