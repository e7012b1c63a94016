"""`python -m workers.cli`: the `fleet` command, for processes that start one without the
installed script (`fleet up` starts its ledger writer and gateway so)."""

import sys

from workers.cli import main

sys.exit(main())
