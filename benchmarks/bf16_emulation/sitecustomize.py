"""bf16 arithmetic for the rank processes of `benchmarks/big_model.py --emulate-bf16`, on a CPU without native bf16.

Python imports this file at start-up when its folder is on PYTHONPATH (big_model.py puts it there, with the
repository, only for that flag). In a process that runs a rank (RANK set) it tells automodel's hardware check that
the CPU has bf16 and computes every bf16 matmul as a float32 matmul of the same values, rounded once to bf16
(benchmarks/bf16_lora_gap.py `Bf16GemmInFp32`): torch's emulated bf16 matmuls, the backward's above all, would
take hours at a 7B model's shapes. Every other operation, and every tensor the run keeps, is bf16 as on a native
CPU; the float32 copies of a matmul's operands live only while it runs, so the peak memory measured this way is at
most a little above a native run's.
"""

import os

if os.environ.get("RANK") is not None:
    import torch

    from automodel.config import precision as _precision
    from benchmarks.bf16_lora_gap import bf16_gemm_in_fp32_mode

    _precision.native_bf16 = lambda device: (True, "bf16 matmuls computed in fp32 (benchmarks/bf16_emulation)")
    bf16_gemm_in_fp32_mode()().__enter__()  # for the life of the process
    del torch
