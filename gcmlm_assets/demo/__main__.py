"""`python -m gcmlm_assets.demo` (what `make demo` runs): see `gcmlm_assets.demo.runner`."""

import sys

from gcmlm_assets.demo.runner import main

sys.exit(main())
