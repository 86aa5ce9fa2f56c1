"""Old name of :mod:`dwskd.model_folder` (a model's exports/ folder), kept for older imports."""

import sys

from dwskd import model_folder

sys.modules[__name__] = model_folder
