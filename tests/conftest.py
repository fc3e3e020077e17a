import os

import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU through the interpreter (set before sol_hf.ops is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")
