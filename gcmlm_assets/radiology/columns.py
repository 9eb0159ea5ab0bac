"""The column schema of `radiomics_row` (plain data, light to import).

`features.py` writes the row (`row_table`); it imports PyRadiomics and SimpleITK, which loading the
definitions must not, so the schema the asset page shows lives here. A test compares it with a
real extracted row (gcmlm_assets_tests/radiology/test_radiology_assets.py).
"""

from gcmlm_assets.columns import Column

# PyRadiomics names a feature `<image type>_<class>_<feature>`; one family per image type it can
# produce, the unfiltered one (`original_`) always, the filtered ones only when the params enable them.
RADIOMICS_ROW_COLUMNS = (
    Column("patient_id", "string", "The scan's partition key: the patient id for a drop's only scan, "
                                   "`<patient>@<timepoint>` for a timepoint's"),
    Column("original_*", "double", "PyRadiomics features of the unfiltered CT inside the gastric mask: "
                                   "shape, first-order and texture classes (107 with the default params)"),
    Column("log-sigma-*", "double", "Features of the Laplacian-of-Gaussian filtered CT, per sigma (rich params)",
           optional=True),
    Column("wavelet-*", "double", "Features of the 8 wavelet decompositions of the CT (rich params)",
           optional=True),
    *(Column(f"{prefix}*", "double", f"Features of the {what} CT (a custom params file)", optional=True)
      for prefix, what in (("square_", "squared"), ("squareroot_", "square-rooted"),
                           ("logarithm_", "logarithm-filtered"), ("exponential_", "exponential-filtered"),
                           ("gradient_", "gradient-magnitude"), ("lbp-2D_", "2-D local binary pattern"),
                           ("lbp-3D-", "3-D local binary pattern"))),
)
