import sys

from blockssl.cli import main

sys.exit(main())
