"""Lymph-node slides: each node as a region, the tumour regions inside it, and the patient's row of
node counts, areas and T/MLN (plain Python, no Dagster).

* `settings.py`: the tunables (threshold, minimum region and node sizes, plausibility bounds);
* `regions.py`: one slide's nodes (its tissue components) and tumour regions, areas on one raster;
* `patient_row.py`: the patient's one-row table (`lymph_nodes.parquet`), written and validated;
* `slide_outputs.py`: per slide the QuPath GeoJSON, the picture and the patches table;
* `patient.py`: `analyse_patient`, all of a patient's files, and the checks' helpers;
* `annotations.py`: a slide's QuPath GeoJSON annotations (`ln_annotations/`) and the patch labels they give;
* `tumour_classifier.py`: the patch classifier's settings, model and skops file;
* `classifier_training.py`: its training set, slide-grouped cross-validation and training-set fingerprint.

T/MLN, the tumour area over the area of the metastatic nodes, follows Wang et al., Nat Commun
2021 (doi 10.1038/s41467-021-21674-7).
"""
