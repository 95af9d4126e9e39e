"""`python -m fastsfu`: the same command line as the `fastsfu` script."""

from fastsfu.server.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
