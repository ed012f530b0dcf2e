"""triton backend: kernels + launchers.

One module per op family (``vocab``, ...) with the ``<op>_forward`` / ``<op>_backward``
launchers that :mod:`rlkernels.backends` looks up; ``_common`` holds the shared launch helpers
and the small ``@triton.jit`` math helpers. On CPU tensors the kernels run under
``TRITON_INTERPRET=1`` (the tests); natively on CUDA / ROCm GPUs.
"""
