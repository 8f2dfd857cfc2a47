"""ShiftAddDSE: measure, search, fine-tune and export multiplication-reduced ViTs for your hardware.

Package map, lowest layer first::

    config, errors, fileio, checkpoints   base: configuration, error classes, atomic files, model checkpoints
    hardware/    devices, NVML, energy sources, environment report, thread counts
    profiling/   layer inventory, non-primitive ops, eager overhead, the profiler, the profile store
    cost/        the cost model, its regression laws, cost sources for a model, validation against measurements
    training/    data, the training loop, distributed runs, pretraining, fine-tuning
    search/      search space, the two-stage search driver, trial storage, sensitivity, Pareto fronts
    deploy/      model -> Relax graph, export to an artifact, loading it, bench against PyTorch
    pipeline/    the whole pipeline, its stage bookkeeping, the report
    commands/, cli, __main__, benchmarks   entry points: one module per ``dse`` subcommand

Layering: a module imports only its own layer and the layers listed above it (``kernels`` <- ``models`` <-
``dse``; inside ``dse`` in the order above), never a higher one, and no imports form a cycle.
``tests/test_layering.py`` checks both.
"""
