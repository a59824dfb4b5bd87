"""AdamW on CPU: are `foreach=True` and `fused=True` bitwise equal to the default per-tensor loop?

5 steps on 4 fp32 tensors (shapes of the 32k Llama's layers) from the same state and gradients:

    python benchmarks/adamw_exactness.py
"""

import torch
torch.manual_seed(0)
shapes = [(512, 256), (256,), (1024, 256), (256, 1024)]
params0 = [torch.randn(s) for s in shapes]
grads = [[torch.randn(s) * 1e-2 for s in shapes] for _ in range(5)]
out = {}
for impl in ("default", "foreach", "fused"):
    ps = [torch.nn.Parameter(p.clone()) for p in params0]
    kw = {} if impl == "default" else {impl: True}
    opt = torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.0, **kw)
    for gs in grads:
        for p, g in zip(ps, gs): p.grad = g.clone()
        opt.step()
    out[impl] = ps
for impl in ("foreach", "fused"):
    d = max((a - b).abs().max().item() for a, b in zip(out[impl], out["default"]))
    eq = all(torch.equal(a, b) for a, b in zip(out[impl], out["default"]))
    print(impl, "vs default: bitwise equal", eq, "max abs diff", d)
