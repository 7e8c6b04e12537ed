"""`python -m npumoe_mlx.cli`: the `npumoe` command."""

import sys

from . import main

sys.exit(main())
