"""The column schemas of the cohort tables (plain data, light to import).

The tables are built by `tables/clinical.py` (clinical_table), `tables/fusion.py` (fused_table) and
`model/modelling.py` (risk_scores, `FusedRiskModel.score_table`); they use pyarrow, numpy and
scikit-learn, which loading the definitions must not import, so the schemas the asset pages show live here.
Tests compare each with a real table (gcmlm_assets_tests/cohort/test_cohort_assets.py).
"""

from gcmlm_assets.columns import Column

PATIENT = Column("patient_id", "string", "The patient")
LABEL = Column("mlm", "int8", "Metachronous liver metastasis: 1 yes, 0 no, null while unknown")

CLINICAL_TABLE_COLUMNS = (
    PATIENT,
    LABEL,
    # clinical.csv may carry any covariates; each keeps its header's name.
    Column("*", "double", "Numeric covariates of clinical.csv, one column each under its header name "
                          "(null = missing)", optional=True),
)

FUSED_TABLE_COLUMNS = (
    PATIENT,
    Column("has_radiology", "bool", "The patient's radiomics_row was used"),
    Column("has_pathology", "bool", "The patient's slide_vector was used"),
    Column("has_clinical", "bool", "The patient has a clinical_table row"),
    LABEL,
    Column("clin_*", "double", "clinical_table's covariates, prefixed", optional=True),
    Column("rad_*", "double", "radiomics_row's PyRadiomics features, prefixed (null without radiology)",
           optional=True),
    Column("path_n_patches", "int64", "slide_vector's n_patches (null without pathology)", optional=True),
    Column("path_n_slides", "int64", "slide_vector's n_slides (null without pathology)", optional=True),
    Column("path_feat_*", "double", "slide_vector's pooled features, prefixed, float64 as pooled "
                                    "(null without pathology)", optional=True),
    # the lymph-node block comes last: a cohort without lymph-node slides keeps every column above in place
    Column("has_lymph_node", "bool", "The patient's lymph_nodes row was used (lymph-node slides analysed)"),
    Column("ln_n_slides", "int64", "lymph_nodes' n_slides: lymph-node slides analysed (bookkeeping, not a model "
                                   "feature; null without lymph nodes)", optional=True),
    Column("ln_n_nodes", "int64", "Lymph nodes found on the patient's lymph-node slides (null without lymph nodes)",
           optional=True),
    Column("ln_n_metastatic_nodes", "int64", "Lymph nodes with tumour (null without lymph nodes)", optional=True),
    Column("ln_tumour_area_mm2", "double", "Tumour area inside the nodes, mm² (null without lymph nodes)",
           optional=True),
    Column("ln_metastatic_node_area_mm2", "double", "Total area of the metastatic nodes, mm² (null without lymph "
                                                    "nodes)", optional=True),
    Column("ln_t_mln", "double", "T/MLN: tumour area / metastatic node area, in [0, 1]; null when no node is "
                                 "metastatic (undefined, not 0) or without lymph nodes (has_lymph_node tells which)",
           optional=True),
    # the delta block after it, for the same reason: a cohort of single CT scans keeps every column above
    Column("has_delta", "bool", "The patient has two or more CT scans whose first and last radiomics rows were used"),
    Column("delta_*", "double", "Change from the first CT scan to the last: per radiomics feature f, delta_f_diff "
                                "(last - first) and delta_f_rel ((last - first) / |first|, NaN when first is 0); "
                                "delta_days (NaN unless both timepoints are dates), delta_similarity (1 = "
                                "identical feature vectors); null without two scans", optional=True),
)

RISK_SCORES_COLUMNS = (
    PATIENT,
    Column("probability", "double", "Predicted probability of MLM: the inverse logit of the fused logit "
                                    "(risk_model's fusion rule over the blocks the patient has)"),
    Column("risk_group", "string", "high when the probability is at or above the model's risk "
                                   "threshold, else low"),
    Column("modalities_used", "string", "The modality models that scored the patient, such as "
                                        "radiology+pathology"),
    Column("modalities_missing", "string", "The model's modalities the patient was scored WITHOUT, such as "
                                           "radiology (its CT failed or there is none), lymph_node (no lymph-node "
                                           "slides) or delta (fewer than two CT scans): empty when none"),
    Column("probability_radiology", "double", "The radiology model's probability (null without radiomics)"),
    Column("probability_pathology", "double", "The pathology model's probability (null without a slide "
                                              "vector; absent when the model pools by ABMIL)", optional=True),
    Column("probability_pathology_abmil", "double", "The ABMIL pathology model's probability (only with "
                                                    "risk_model.pathology_pooling abmil)", optional=True),
    Column("probability_clinical", "double", "The clinical model's probability (only with "
                                             "risk_model.use_clinical)", optional=True),
    Column("probability_lymph_node", "double", "The lymph-node model's probability (null without lymph-node "
                                               "slides; absent when the model has no lymph-node block: too few "
                                               "labelled patients have lymph-node slides)", optional=True),
    Column("probability_delta", "double", "The delta model's probability (change between the first and last CT "
                                          "scan; null with fewer than two scans; absent when the model has no delta "
                                          "block: too few labelled patients have two scans)", optional=True),
    Column("mlm", "int8", "The known label, for comparison (null while unknown)"),
    Column("model_version", "string", "The risk_model version that scored the patient (its folder under "
                                      "risk_model/)"),
    Column("explanation_key", "string", "The key of the explanation this score needs: a hash of the "
                                        "explanation code, the model file, the patient's fused_table row and "
                                        "patch features (risk_explanations records the key it explained)"),
)
