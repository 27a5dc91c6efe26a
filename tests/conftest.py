import os

import torch

# Two cores on CI: keep torch from oversubscribing them and keep results reproducible.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
