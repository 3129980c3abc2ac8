"""`python -m dualproxy` is the `dualproxy` command."""

import sys

from dualproxy.cli.main import main

sys.exit(main())
