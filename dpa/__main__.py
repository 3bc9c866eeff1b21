"""`python -m dpa` is the `dpa` command."""

import sys

from dpa.cli import main

sys.exit(main())
