"""mixsup.serving: run exported networks on Triton Inference Server (never imports torch).

- ``tiling``: 2.5D slice stacks, tiles and Gaussian blending (sliding-window inference in numpy);
- ``fuse``: weighted average of ensemble members -> labels;
- ``runtime``: ONNX Runtime sessions and the execution-provider choice;
- ``launcher`` / ``cli``: the ``mixsup-serve`` command that starts and stops Triton;
- ``supervisor``: the process between the launcher and Triton that stops Triton when the launcher is gone;
- ``processes``: /proc helpers and the ``/dev/shm`` regions named after their launcher;
- ``triton``: the python-backend models that the repository's thin ``model.py`` files point to.
"""
