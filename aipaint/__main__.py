import sys

from aipaint.cli.main import main

sys.exit(main())
