"""Puts tests/parallel on sys.path so tests and workers share launcher.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
