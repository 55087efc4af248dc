"""Data (ZeRO 0-3), tensor (Megatron) and expert parallelism on torch.distributed, applied to the single-device model
from outside: ``layout`` (checks of [parallel] against the world size), ``mesh`` (the DeviceMesh), ``launch``
(process group from torchrun), ``tensor_parallel``, ``expert_parallel``, ``data_parallel`` / ``zero1``, ``runtime``
(what the training loop calls). See docs/parallelism.md.
"""
