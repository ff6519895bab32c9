"""``python -m controldiff``: the ``controldiff`` command."""
import sys

from controldiff.cli import main

sys.exit(main())
