"""``python -m xslim_ort``: the same command line as ``xslim-ort``, xslim's flags included."""

import sys

from .cli import main

sys.exit(main())
