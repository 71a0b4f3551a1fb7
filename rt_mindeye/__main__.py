import sys

from rt_mindeye.cli import main

sys.exit(main())
