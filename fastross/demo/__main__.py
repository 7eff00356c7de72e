"""`python -m fastross.demo` (what `make demo` runs): the CPU demo, fastross/demo/__init__.py."""

import sys

from fastross.demo import main

sys.exit(main())
