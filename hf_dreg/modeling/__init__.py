"""Reading a model: which modules are linear (:mod:`.layers`), where its DREG sites are (:mod:`.sites`, by data
flow), which positions count (:mod:`.positions`), the hooks that attach the penalty (:mod:`.hooks`:
:func:`attach` and :class:`DREGHandle`), and per-site diagnostics (:mod:`.diagnostics`).
"""
