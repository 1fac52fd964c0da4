"""``python -m ssd_keras`` is ``ssd-run``."""

import sys

from .cli import main

sys.exit(main())
