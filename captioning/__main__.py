"""``python -m captioning`` = the ``captioning`` console script."""

import sys

from captioning.commands.main import main

if __name__ == "__main__":
    sys.exit(main())
