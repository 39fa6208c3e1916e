import sys

from gpucostd.cli import main

sys.exit(main())
