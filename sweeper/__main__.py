"""``python -m sweeper [overrides]``: see sweeper/cli.py."""

from sweeper.cli import main

if __name__ == "__main__":
    main()
