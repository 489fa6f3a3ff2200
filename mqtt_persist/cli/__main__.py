"""``python -m mqtt_persist.cli``: the same as the ``mqtt-persist`` console script."""

import sys

from mqtt_persist.cli import main

sys.exit(main())
