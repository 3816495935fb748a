"""``python -m msg``: the msg command line (with no command, start the broker)."""

from msg.cli import main

if __name__ == "__main__":
    main()
