"""Child process of the untrusted-files fuzz suite: loads one checkpoint per stdin line
(see files_mutators.run_worker).

Each line is {"id", "path"}; for each it prints {"id", "started": true} before loading and
{"id", "type", "msg"} or {"id", "ok": true} after, so the parent knows which case a crash
(a signal) or a hang belongs to.
"""

import json
import sys

from mlx_deepseek import load_model
from mlx_deepseek.errors import DeepSeekError


def main() -> None:
    for line in sys.stdin:
        case = json.loads(line)
        print(json.dumps({"id": case["id"], "started": True}), flush=True)
        try:
            load_model(case["path"])
            result = {"ok": True}
        except Exception as e:  # what a user would see: the CLI prints DeepSeekError as one line
            result = {
                "type": type(e).__name__,
                "msg": str(e),
                "clean": isinstance(e, DeepSeekError),
            }
        print(json.dumps({"id": case["id"], **result}), flush=True)


if __name__ == "__main__":
    main()
