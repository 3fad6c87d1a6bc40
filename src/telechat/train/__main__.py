"""`deepspeed [--hostfile H] -m telechat.train --stage sft --data D ...`: the `telechat train` flags."""
import sys

from ..cli import main

if __name__ == "__main__":
    # DeepSpeed's launcher adds --local_rank=N (the rank also comes in the environment).
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    sys.exit(main(["train", *args]))
