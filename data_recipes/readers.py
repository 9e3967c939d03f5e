"""Moved to `recforge.readers`, since every stage reads through it; this name stays importable.

The module object is the same one (not a copy), so `recforge.data_recipes.readers.X is recforge.readers.X`
for every name, private ones included.
"""

import sys

from recforge import readers as _readers

sys.modules[__name__] = _readers
