import sys

from distrib.cli import main

sys.exit(main())
