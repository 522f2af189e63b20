"""Runtime tests share tiny model builders (``tiny_models.py`` beside this file); with pytest's importlib mode
the test directory is not on sys.path, so put it there."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
