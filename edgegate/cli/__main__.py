"""``python -m edgegate.cli``: the same as the ``edgegate`` command."""

import sys

from edgegate.cli import main

sys.exit(main())
