"""Triton backend of cl_fast: one module per op family, imported by name where it is used.

infonce   nt_xent, info_nce, clip_loss: ntxent_fwd/bwd, cross_fwd/bwd, MAX_DIM (DESIGN.md's
          backend interface; cl_fast._dispatch loads "cl_fast.triton_kernels.infonce").
moco, byol, sinkhorn: the MoCo, BYOL and SwAV kernels.

Nothing is imported here, so one module failing to import leaves the others usable.
"""
