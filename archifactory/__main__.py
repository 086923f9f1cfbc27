"""`python -m archifactory …` (what `torchrun -m archifactory train …` runs)."""

import sys

from archifactory.cli import main

sys.exit(main())
