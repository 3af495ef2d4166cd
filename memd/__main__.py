"""``python -m memd``: the same entry point as the ``memd`` console script."""

from memd.cli import entry

if __name__ == "__main__":
    entry()
