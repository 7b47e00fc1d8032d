"""``python -m logitstore`` (and ``torchrun -m logitstore``): the command line."""

import sys

from .cli import main

sys.exit(main())
