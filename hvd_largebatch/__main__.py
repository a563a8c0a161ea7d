"""``python -m hvd_largebatch``: the same as the ``hvd-largebatch`` console script."""

import sys

from hvd_largebatch.cli import main

sys.exit(main())
