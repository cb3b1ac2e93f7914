"""`python -m benchmarks [options]`: run the sweep (see benchmarks/README.md)."""
import sys

from .cli import main

sys.exit(main())
