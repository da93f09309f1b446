import sys

from fedjax_core.cli import main

sys.exit(main())
