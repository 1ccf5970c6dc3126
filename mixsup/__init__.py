"""mixsup: mixed-supervision CT segmentation, from training to Triton serving.

The core package holds what every stage shares (scans, the model contract, post-processing, metrics) and
imports neither torch nor tritonclient, so the client and the serving code stay light.
"""
__version__ = "0.1.0"
