"""Triton python-backend entry point of the fuse model.

Written by mixsup.repository. The logic lives in mixsup.serving.triton.fuse, where it is tested
outside Triton; this file only tells the python backend where to find it.
"""
from mixsup.serving.triton.fuse import TritonPythonModel  # noqa: F401
