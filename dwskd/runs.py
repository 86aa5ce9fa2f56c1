"""Old name of :mod:`dwskd.rundir` (the run directory), kept so that older imports still work."""

import sys

from dwskd import rundir

sys.modules[__name__] = rundir
