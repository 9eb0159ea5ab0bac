"""gcmlm_assets: CT + H&E radiopathomics assets for metachronous liver metastasis prediction."""

__version__ = "0.1.0"
