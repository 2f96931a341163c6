"""Scale-out: the encoders and the fusion model as Ray Serve deployments.

Chosen with ``MMCDS_MODEL_BACKEND=ray``; see ``mmcds.serving.backend``.
"""
