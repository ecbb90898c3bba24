"""``python -m embedseg_service.core.cli``: the ``embedseg`` command line."""

import sys

from embedseg_service.core.cli.program import main

sys.exit(main())
