"""``python -m lightning_lossmix report RUN [RUN ...] -o OUT``: the package's command line."""

from lightning_lossmix.report import main

if __name__ == "__main__":
    raise SystemExit(main())
