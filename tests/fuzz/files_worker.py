"""Child process of the untrusted-files fuzz suite (see files_mutators.run_worker): one
checkpoint per stdin line {"id", "path", "command"}; "load" calls mlx_deepseek.load_model,
"info" runs `mlx-deepseek info`. For each it prints {"id", "started": true} first and
{"id", "type", "msg", "clean"} or {"id", "ok": true} after, so the parent knows which
case a crash (a signal) or a hang belongs to.
"""

import json
import sys

from typer.testing import CliRunner

from mlx_deepseek import load_model
from mlx_deepseek.cli import app
from mlx_deepseek.errors import DeepSeekError


def run(case: dict) -> None:
    if case["command"] == "load":
        load_model(case["path"])
        return
    result = CliRunner().invoke(app, [case["command"], case["path"]])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    if result.exit_code != 0:
        raise RuntimeError(f"exit code {result.exit_code}: {result.output}")


def main() -> None:
    for line in sys.stdin:
        case = json.loads(line)
        print(json.dumps({"id": case["id"], "started": True}), flush=True)
        try:
            run(case)
            result = {"ok": True}
        except Exception as e:  # what a user would see: the CLI prints DeepSeekError as one line
            clean = isinstance(e, DeepSeekError)
            result = {"type": type(e).__name__, "msg": str(e), "clean": clean}
        print(json.dumps({"id": case["id"], **result}), flush=True)


if __name__ == "__main__":
    main()
