"""What exists only for time and memory; the recipe reaches it through engine.working_copy.

working_copy.py    theta and the protocol the recipe uses
weights_file.py    safetensors read a tensor (or a few rows) at a time   (aligned_copy=stream)
truncated_model.py the model cut after layer E-1, upper layers read back for the probe
packed_batches.py  one sequence per batch, the shared prefix once        (packing)
attention.py       gradient-pass attention kernels                      (block_attention; CPU)
candidates.py      the candidate tensors, fp32 or bf16 + signs          (low_memory)
packed_signs.py    signs at 2 bits                                      (low_memory)
summed_linear.py   weight gradients added straight into fp32 sums       (low_memory)
selection.py       the k-th largest |grad| in one pass, no concatenation
memory.py          one allocation per kind of state; sums spilled while the probe runs
"""
