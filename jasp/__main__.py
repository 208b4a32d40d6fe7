"""``python -m jasp``: the ``jasp`` command line (see :mod:`jasp.export.cli`)."""

import sys

from jasp.export import cli

if __name__ == "__main__":
  sys.exit(cli.main())
