#!/usr/bin/env python
"""Train InternVL with MPO.

python train/train_mpo.py --config configs/demo.yaml [key.sub=value ...]
deepspeed --num_gpus 8 train/train_mpo.py --config configs/internvl2_5_1b_mpo.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from mpo.cli import cmd_train  # noqa: E402

if __name__ == "__main__":
    sys.exit(cmd_train(sys.argv[1:]))
