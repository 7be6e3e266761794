"""`python -m adapeft`: the `adapeft` command, for environments whose scripts folder is not on PATH."""
import sys

from .apps.cli import main

sys.exit(main())
