#!/usr/bin/env python3
"""Lines per file of the citadel crates and their largest functions (issue 10's measure).

usage: docs/shape.py [GIT_REV] [N]   (default: the work tree, N=5)
Function sizes count the lines from `fn` to its closing brace in rustfmt'd code; code after a
top-level `#[cfg(test)]` (the test modules) is left out of the function ranking.
"""
import re, subprocess, sys

ROOTS = ["citadel/src", "citadel/proto/src", "citadel/work/src", "citadel/cli/src"]
rev = sys.argv[1] if len(sys.argv) > 1 else None
top = int(sys.argv[2]) if len(sys.argv) > 2 else 5


def files():
    if rev:
        out = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "--", *ROOTS], capture_output=True, text=True, check=True).stdout
    else:
        out = subprocess.run(["git", "ls-files", "--", *ROOTS], capture_output=True, text=True, check=True).stdout
    return [f for f in out.split() if f.endswith(".rs")]


def text(f):
    if rev:
        return subprocess.run(["git", "show", f"{rev}:{f}"], capture_output=True, text=True, check=True).stdout
    return open(f).read()


FN = re.compile(r"^(\s*)(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?fn\s+(\w+)")
funcs, total = [], 0
rows = []
for f in sorted(files()):
    lines = text(f).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    rows.append((len(lines), f))
    total += len(lines)
    impl = None
    for i, l in enumerate(lines):
        if l.startswith("#[cfg(test)]"):
            break
        m = re.match(r"^impl(<.*?>)?\s+(.*?)\s*\{?$", l)
        if m:
            impl = re.sub(r"<.*", "", m.group(2).split(" for ")[-1])
        elif l.startswith("}"):
            impl = None
        m = FN.match(l)
        if not m or l.rstrip().endswith(";"):
            continue
        ind = m.group(1)
        for j in range(i, len(lines)):
            if lines[j] == ind + "}" or (j == i and l.rstrip().endswith("}")):
                name = (impl + "::" if impl and ind else "") + m.group(7)
                funcs.append((j - i + 1, f"{f}:{i + 1} {name}"))
                break

for n, f in rows:
    print(f"{n:6} {f}")
print(f"{total:6} total ({len(rows)} files)")
print(f"largest functions (outside test modules):")
for n, where in sorted(funcs, reverse=True)[:top]:
    print(f"{n:6} {where}")
