"""The math of DREG, free of any model: the formulas (:mod:`.formulas`), the activations' analytic
derivatives (:mod:`.activations`), the autograd Functions of a site (:mod:`.functions`), the kernel cache
and its fallback (:mod:`.kernels`), and a LoRA layer's row statistics from its factors (:mod:`.low_rank`).
"""
