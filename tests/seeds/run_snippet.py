"""Run a code sample the way ``python -m asyncio`` runs a line: top-level ``await`` allowed."""

import ast
import asyncio
import sys

path = sys.argv[1]
with open(path) as f:
    source = f.read()
code = compile(source, path, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
outcome = eval(code, {"__name__": "__main__"})
if asyncio.iscoroutine(outcome):
    asyncio.run(outcome)
