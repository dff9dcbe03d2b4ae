"""``python -m sockguard``: the same as the console script."""

import sys

from sockguard.cli.commands import main

sys.exit(main())
