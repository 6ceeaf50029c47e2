"""``python -m fleet``."""

import sys

from .cli import main

sys.exit(main())
