"""`deepspeed [--hostfile H] -m telechat.train --stage sft --data D ...`: the `telechat train` flags."""
import os
import sys

from ..cli import main

if __name__ == "__main__":
    # DeepSpeed's launcher adds --local_rank=N (the rank also comes in the environment).
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    code = main(["train", *args])
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip C++ static destructors: with DeepSpeed's CPU backend a rank sometimes aborts there ("terminate
    # called without an active exception", about 1 run in 12) after every checkpoint is written and the
    # process group is destroyed, and the launcher then reports the whole run as failed.
    os._exit(code or 0)
