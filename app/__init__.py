"""tuneserve: a self-hosted LoRA fine-tuning service with an OpenAI-compatible API.

OpenMP's default spin-waiting makes torch several times slower when the CPU is shared (a worker next to an
API, or tests on a small machine); passive waiting costs little when it is not. It only takes effect if set
before torch is first imported, which is why it is here, in the package every process imports first; an
explicit value in the environment wins.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
