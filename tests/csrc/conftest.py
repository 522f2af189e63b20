"""With pytest's importlib mode the test directory is not on sys.path; put it there so that test modules can share
setup with their siblings (the split-K Hopper tests reuse the unsplit ones' backend check, tile ids and inputs)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
