"""Imported first by the test ranks: they need no torch (a test-only dependency here, absent
on a Mac), and transformers imports it whenever it is installed (half a minute on a loaded CI
machine). Marking it missing keeps the ranks' start-up short; the code under test is the same.
"""

import sys

sys.modules.setdefault("torch", None)
