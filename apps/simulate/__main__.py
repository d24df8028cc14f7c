import sys

from apps.simulate.cli import main

sys.exit(main())
