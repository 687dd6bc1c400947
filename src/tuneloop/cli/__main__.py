"""``python -m tuneloop.cli``: the same as the ``tuneloop`` console script."""

from tuneloop.cli import main

main()
