"""`python -m archifactory …` (what `torchrun -m archifactory train …` runs)."""

import sys

from archifactory.cli.main import main

sys.exit(main())
