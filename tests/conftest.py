"""Tests never reach the network: the hub is offline for every test.

setuptools is imported first: Inductor's C++ builder imports it (through
torch.utils.cpp_extension) in the middle of a compile, and in a long test session its
distutils shim has been seen to fall back to the standard library's distutils there
(AssertionError: .../python3.11/distutils/core.py). Loaded at start-up, it is in place
before anything compiles.
"""

import os

import setuptools  # noqa: F401

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
