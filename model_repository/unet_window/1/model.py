"""Triton python-backend entry point of the sliding-window model.

Written by mixsup.repository. The logic lives in mixsup.serving.triton.window, where it is tested
outside Triton; this file only tells the python backend where to find it.
"""
from mixsup.serving.triton.window import TritonPythonModel  # noqa: F401
