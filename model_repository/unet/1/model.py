"""Triton python-backend entry point of the network model.

Written by mixsup.repository. The logic lives in mixsup.serving.triton.network, where it is tested
outside Triton; this file only tells the python backend where to find it.
"""
from mixsup.serving.triton.network import TritonPythonModel  # noqa: F401
