"""Edit quality on flux-mini, FluxSpace against baselines (issue 5). See fluxspace/mini/edit_quality.py.

    python benchmarks/edit_quality.py [--seeds 128] [--tune-seeds 32]
    torchrun --nproc_per_node 2 benchmarks/edit_quality.py ...
"""

from fluxspace.mini.edit_quality import main

if __name__ == "__main__":
    main()
