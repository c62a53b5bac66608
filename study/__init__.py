"""The study behind hf_dreg: does DREG help, and what does it cost?

Not part of the installed package: it imports the library (``hf_dreg``) like any user, and runs from the
repository root (``python -m study.sweep``, ``python -m study.report``, ``python -m study.select_baselines``).

- ``sweep``: factorial sweeps of :func:`hf_dreg.recipes.classification.run_classification`, resumable, local or on Ray;
- ``report``: paired tests, ranks and plots of a sweep's results;
- ``baselines`` and ``baselines_report``: the competent plain baselines, chosen on a validation split;
- ``configs/``, ``results/``: the sweeps' YAML and what they produced; ``benchmarks/``: the cost measurements.
"""
