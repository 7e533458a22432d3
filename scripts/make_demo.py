#!/usr/bin/env python
"""Build the tiny InternVL + tokenizer, the demo MMPR data and its VLMEvalKit-style benchmark (deterministic, no downloads)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpo.demo import write_demo_benchmark, write_demo_data  # noqa: E402
from mpo.model.tiny import save_tiny_internvl  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-dir", default="data/tiny-internvl")
    p.add_argument("--data-dir", default="data/demo")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print("tiny model:", save_tiny_internvl(a.model_dir, seed=a.seed))
    paths = write_demo_data(a.data_dir, seed=a.seed)
    print("demo data:", ", ".join(str(v) for v in paths.values()))
    print("demo benchmark:", write_demo_benchmark(a.data_dir, seed=a.seed))


if __name__ == "__main__":
    main()
