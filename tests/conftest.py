"""Shared test set-up: import the top-level scripts, stay offline, keep runs small and repeatable."""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a missing model fails at once, never downloads
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
