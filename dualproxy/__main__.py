"""`python -m dualproxy` is the `dualproxy` command."""

import sys

from .cli import main

sys.exit(main())
