"""``python -m fastbn``: the command line, which lives in :mod:`fastbn.tools.cli`."""

import sys

if __name__ == "__main__":
    from fastbn.tools.cli import main

    sys.exit(main())
