"""``python -m edgegate.cli``: the same as the ``edgegate`` command."""

from edgegate.cli import run

run()
