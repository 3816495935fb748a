"""``python -m msg.broker``: start the broker (same flags as ``msg serve``)."""

import sys

from msg.cli import main

if __name__ == "__main__":
    main(["serve", *sys.argv[1:]])
