import sys

from mtp.cli import main

sys.exit(main())
