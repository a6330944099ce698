"""Suite-wide settings."""

import torch

# The suite runs many tiny tensor ops: OpenMP thread hand-offs cost more than they save there,
# and on a busy 2-core machine they can make small ops tens of times slower.
torch.set_num_threads(1)
