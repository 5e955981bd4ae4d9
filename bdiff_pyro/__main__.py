import sys

from bdiff_pyro.cli import main

sys.exit(main())
