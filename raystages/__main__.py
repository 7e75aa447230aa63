"""``python -m raystages``: the same command as the ``raystages`` entry point, exit codes included."""

import sys

from raystages.cli import main

sys.exit(main())
