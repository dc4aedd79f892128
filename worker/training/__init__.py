"""The LoRA training engine: spec -> tokenized, packed data -> PEFT adapter, with callbacks.

OpenMP's default spin-waiting makes torch several times slower when the CPU is shared (a worker next to an
API, or tests on a small machine); passive waiting costs little when it is not. It only takes effect if set
before torch is first imported, so the worker's environment should set it too; an explicit value wins.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
