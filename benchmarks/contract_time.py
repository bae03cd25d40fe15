"""Cost of the contract test per registered method: one contract run plus the determinism rerun.

The contract (``clbench.contract``) runs two tasks of the synthetic stream on the micro ViT on CPU; each
method's share of ``tests/test_contract.py`` should stay well under 10 s. Times are process CPU seconds
(a shared machine's wall time measures its neighbours) after one warm-up run that pays the imports.
Prints ``contract_cpu_s/<method>=<seconds>`` lines.

Run: ``.venv/bin/python benchmarks/contract_time.py [--plugins-dir DIR]``
"""

from __future__ import annotations

import argparse
import time

from clbench import contract
from clbench.methods.registry import discover


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plugins-dir", action="append", default=[])
    args = ap.parse_args()
    reg = discover(args.plugins_dir, strict=False)
    stream = contract.contract_stream(0)
    contract.contract_run(reg.get("lora").cls, stream=stream)  # warm-up: imports, first allocations
    for name in sorted(reg.methods):
        cls = reg.methods[name].cls
        tic = time.process_time()
        run = contract.contract_run(cls, stream=stream)
        contract.check_run(run)
        contract.check_determinism(cls, run, stream=stream)
        print(f"contract_cpu_s/{name}={time.process_time() - tic:.2f}")


if __name__ == "__main__":
    main()
