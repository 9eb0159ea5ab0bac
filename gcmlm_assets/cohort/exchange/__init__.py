"""The cohort's results in the formats other systems read (no Dagster): FHIR R4 RiskAssessments."""
