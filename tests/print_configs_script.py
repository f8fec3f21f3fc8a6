"""``train.py <args> --print_config`` for many argument lists in one process: importing torch and
Lightning is most of each run's time. Reads a JSON list of argument lists on stdin and prints one
JSON object per list: its exit code and what it printed."""

import contextlib
import io
import json
import sys

import train

for args in json.load(sys.stdin):
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        sys.argv = ["train.py", *args]
        try:
            train.main()
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    print(json.dumps({"args": args, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}))
