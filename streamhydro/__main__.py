import sys

from streamhydro.cli import main

sys.exit(main())
