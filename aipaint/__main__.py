import sys

from aipaint.cli import main

sys.exit(main())
