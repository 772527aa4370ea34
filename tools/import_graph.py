#!/usr/bin/env python3
"""List the crate's internal import edges (`crate::a::b`, `super::x`) between files and folders, and report cycles.

Usage: tools/import_graph.py [--edges] [--tests] [--src src]

Prints the import circles between files (strongly connected components of the file graph, leaving out a
module's edges to its own children and parent `mod.rs`), the circles between top-level folders, and the edges that
break the allowed direction (a stage importing from a stage above it; see README "Layout"). Exit status 1 when
any cycle or back-edge is found. Code inside `#[cfg(test)] mod tests { ... }` is left out unless `--tests` is given
(tests may compare a module with a reference one level up, e.g. a fused kernel with the composed layer).
"""
import os
import re
import sys

# Allowed direction (README "Layout"): what each top-level module may import besides itself. The base modules
# (`lib`, `alloc`, `rng`, `fsutil`, `device`, `progress`, `plot`) import only each other; `main` and `iterate` may use all.
BASE = {"lib", "alloc", "rng", "fsutil", "device", "progress", "plot", "panic"}
ALLOWED = {
    "model": BASE,
    "client": BASE,
    "data": BASE | {"model"},
    # Scale-out (MPI ranks, sharded parts): below the stages that run in parallel.
    "dist": BASE | {"data"},
    "sample": BASE | {"model", "data", "client", "dist"},
    "score": BASE | {"model", "data", "client", "dist"},
    "train": BASE | {"model", "data", "dist"},
    "eval": BASE | {"model", "data", "client", "dist", "sample", "score"},
    "bench": BASE | {"model", "data", "dist", "sample", "score", "train"},
}


def module_of(path, src):
    rel = os.path.relpath(path, src)[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib", "main"):
        rel = rel[:-1] if rel[-1] == "mod" else rel[:-1] or []
    return tuple(rel)


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(line.split("//")[0] if '"' not in line.split("//")[0] else line for line in text.splitlines())


def strip_tests(text):
    """Removes `#[cfg(test)] mod name { ... }` blocks (brace matched)."""
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*(pub(\([a-z]+\))?\s+)?mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i:m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += text[j] == "{"
            depth -= text[j] == "}"
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def expand_use(tree):
    """Expands `a::{b, c::{d, e}}` into ["a::b", "a::c::d", "a::c::e"]."""
    tree = tree.replace(" ", "").replace("\n", "")
    depth, start = 0, None
    for i, ch in enumerate(tree):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                prefix, inner, rest = tree[:start], tree[start + 1:i], tree[i + 1:]
                parts, d, cur = [], 0, ""
                for c in inner:
                    if c == "," and d == 0:
                        parts.append(cur)
                        cur = ""
                        continue
                    d += c == "{"
                    d -= c == "}"
                    cur += c
                parts.append(cur)
                return [x for p in parts if p for x in expand_use(prefix + p + rest)]
    return [tree]


def main():
    args = sys.argv[1:]
    src = args[args.index("--src") + 1] if "--src" in args else "src"
    files = {}
    for root, _, names in os.walk(src):
        for n in names:
            if n.endswith(".rs"):
                p = os.path.join(root, n)
                files[module_of(p, src)] = p
    if ("main",) not in files and os.path.join(src, "main.rs") in files.values():
        pass
    main_rs = os.path.join(src, "main.rs")
    modules = set(files)

    def resolve(mod, path):
        parts = [p for p in path.split("::") if p]
        if not parts:
            return None
        if parts[0] == "crate":
            base, parts = (), parts[1:]
        elif parts[0] in ("super", "self"):
            base = mod
            while parts and parts[0] in ("super", "self"):
                if parts[0] == "super":
                    base = base[:-1]
                parts = parts[1:]
        elif parts[0] == "rrhf":
            base, parts = (), parts[1:]
        else:
            return None
        best = base if base in modules else None
        for i in range(1, len(parts) + 1):
            cand = base + tuple(parts[:i])
            if cand in modules:
                best = cand
        return best

    edges = {}
    for mod, path in files.items():
        if path == main_rs:
            mod = ("main",)
        text = strip_comments(open(path, encoding="utf-8").read())
        if "--tests" not in args:
            text = strip_tests(text)
        paths = []
        for m in re.finditer(r"\buse\s+([^;]+);", text):
            paths += expand_use(m.group(1))
        paths += re.findall(r"\b((?:crate|super|rrhf)(?:::[A-Za-z_][A-Za-z0-9_]*)+)", text)
        key = mod
        for p in paths:
            p = p.split(" as ")[0]
            target = resolve(mod if mod != ("main",) else (), p)
            if target is None or target == key:
                continue
            # a folder's mod.rs declaring its children, or a child naming its parent, is structure, not a dependency
            if target[: len(key)] == key and path.endswith("mod.rs"):
                continue
            edges.setdefault(key, set()).add(target)

    def name(m):
        return "/".join(m) or "lib"

    if "--edges" in args:
        for a in sorted(edges):
            for b in sorted(edges[a]):
                print(f"{name(a)} -> {name(b)}")

    # file cycles: Tarjan's SCC
    def sccs(graph, nodes):
        index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
        sys.setrecursionlimit(10000)

        def visit(v):
            index[v] = low[v] = counter[0]
            counter[0] += 1
            stack.append(v)
            on.add(v)
            for w in graph.get(v, ()):
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in on:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))

        for v in sorted(nodes):
            if v not in index:
                visit(v)
        return out

    # a parent module (mod.rs) importing its own child is not a cycle by itself; drop parent<->child edges
    fgraph = {a: {b for b in bs if not (a[: len(b)] == b or b[: len(a)] == a)} for a, bs in edges.items()}
    nodes = set(edges) | {b for bs in edges.values() for b in bs}
    file_cycles = sccs(fgraph, nodes)
    print(f"file import circles: {len(file_cycles)}")
    for c in file_cycles:
        print("  " + " <-> ".join(name(m) for m in c))

    top = lambda m: m[0] if m else "lib"
    tgraph = {}
    for a, bs in edges.items():
        for b in bs:
            if top(a) != top(b):
                tgraph.setdefault(top(a), set()).add(top(b))
    folder_cycles = sccs(tgraph, set(tgraph) | {b for bs in tgraph.values() for b in bs})
    print(f"folder import circles: {len(folder_cycles)}")
    for c in folder_cycles:
        print("  " + " <-> ".join(c))

    back = []
    for a, bs in sorted(edges.items()):
        for b in sorted(bs):
            ta, tb = top(a), top(b)
            allowed = BASE if ta in BASE else ALLOWED.get(ta)
            if ta != tb and allowed is not None and tb not in allowed:
                back.append(f"{name(a)} -> {name(b)}")
    print(f"back-edges (imports the allowed direction forbids): {len(back)}")
    for e in back:
        print("  " + e)
    sys.exit(1 if file_cycles or folder_cycles or back else 0)


if __name__ == "__main__":
    main()
