#!/usr/bin/env python3
"""Keeps a corpus under a byte budget: greedy weighted set cover over the control file of a
libFuzzer merge (-merge=1 -merge_control_file=CONTROL), taking inputs by new features per byte
until BUDGET bytes, and copies them to OUT (which .ci/run then replays). Prints how many
features the kept inputs cover out of all.
Usage: corpus_budget.py CONTROL BUDGET OUT"""
import os, shutil, sys
ctl, budget, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lines = open(ctl).read().split("\n")
n = int(lines[0]); files = lines[2:2 + n]
feats = {}
for l in lines[2 + n:]:
    p = l.split()
    if p and p[0] == "FT":
        feats[int(p[1])] = set(map(int, p[2:]))
allf = set().union(*feats.values())
size = {i: os.path.getsize(files[i]) for i in feats}
have, chosen, used = set(), [], 0
cand = {i: f for i, f in feats.items() if f}
while cand:
    best = max(cand, key=lambda i: (len(cand[i] - have) / size[i], -size[i]))
    gain = len(cand[best] - have)
    if gain == 0: break
    if used + size[best] > budget:
        del cand[best]; continue
    have |= cand.pop(best); chosen.append(best); used += size[best]
os.makedirs(out, exist_ok=True)
for i in chosen:
    shutil.copy(files[i], os.path.join(out, os.path.basename(files[i])))
print(f"files={len(chosen)} bytes={used} features={len(have)}/{len(allf)}")
