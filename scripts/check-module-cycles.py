#!/usr/bin/env python3
"""Fails when two modules of a crate import each other, directly or through a third.

ARCHITECTURE.md's rule: the modules of each crate form a tree of dependencies, so each can
be read (and tested) after the ones it uses. A parent and its own submodules are one unit
(a submodule may use its parent's items, and the parent re-exports its children); the
cycles that count are among *siblings*: `crate::a::x` using `crate::a::y` while `y`,
directly or through other siblings under `a`, uses `x`. A reference from anywhere inside
`x` (its submodules included) to anywhere inside `y` is an edge `x -> y` at `a`.

References are read from the source text: `use` trees (braces expanded), and paths that
start with `crate::`, `super::` or `self::` in code. Comments, strings and `#[cfg(test)]`
modules are left out: tests may reach across, and doc links do not make a dependency.

    scripts/check-module-cycles.py [CRATE_SRC_DIR...]   (default: every crates/*/src)
"""
import pathlib
import re
import sys

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def module_files(src: pathlib.Path):
    """(module path tuple, file) for every module file under src."""
    for f in sorted(src.rglob("*.rs")):
        rel = f.relative_to(src).with_suffix("")
        parts = list(rel.parts)
        if parts in (["lib"], ["main"]):
            parts = []
        elif parts[-1] == "mod":
            parts = parts[:-1]
        elif parts[0] == "bin":
            continue
        yield tuple(parts), f


def strip(text: str) -> str:
    """The code without comments, string literals and `#[cfg(test)]` modules."""
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'r#*"(?:.|\n)*?"#*', '""', text)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*mod\s+" + IDENT + r"\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i : m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def expand_use(tree: str):
    """Every path of a `use` tree: `a::{b, c::{d, e}}` -> a::b, a::c::d, a::c::e."""
    tree = re.sub(r"\s+", "", tree)
    if "{" not in tree:
        yield re.sub(r"as" + IDENT + "$", "", tree)
        return
    head, _, rest = tree.partition("{")
    body = rest[: rest.rfind("}")]
    depth, start = 0, 0
    for k, c in enumerate(body + ","):
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif c == "," and depth == 0:
            part = body[start:k]
            start = k + 1
            if part:
                yield from expand_use(head + part)


def references(code: str):
    """Paths starting with crate/super/self, as lists of segments."""
    for m in re.finditer(r"\buse\s+([^;]*);", code):
        for path in expand_use(m.group(1)):
            if path.split("::")[0] in ("crate", "super", "self"):
                yield path.split("::")
    code = re.sub(r"\buse\s+[^;]*;", "", code)
    for m in re.finditer(r"\b((?:crate|super|self)(?:\s*::\s*" + IDENT + r")+)", code):
        yield re.sub(r"\s+", "", m.group(1)).split("::")


def resolve(module, segments, modules):
    """The deepest known module a path from `module` names (None when outside the crate)."""
    if segments[0] == "crate":
        base, rest = (), segments[1:]
    else:
        base, rest = module, segments
        while rest and rest[0] in ("super", "self"):
            if rest[0] == "super":
                base = base[:-1]
            rest = rest[1:]
    target = base
    for seg in rest:
        if target + (seg,) in modules:
            target = target + (seg,)
        else:
            break
    return target


def cycles(src: pathlib.Path):
    files = dict(module_files(src))
    modules = set(files)
    edges = {}  # parent -> {child -> set(child)}
    for module, f in files.items():
        for segments in references(strip(f.read_text())):
            target = resolve(module, segments, modules)
            n = 0
            while n < min(len(module), len(target)) and module[n] == target[n]:
                n += 1
            if n == len(module) or n == len(target):
                continue  # an ancestor or a descendant: one unit
            parent = module[:n]
            edges.setdefault(parent, {}).setdefault(module[n], set()).add(target[n])
    found = []
    for parent, graph in edges.items():
        # Tarjan's strongly connected components.
        index, low, stack, on, counter = {}, {}, [], set(), [0]

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
                    found.append((parent, sorted(comp), graph))

        for v in list(graph):
            if v not in index:
                visit(v)
    return found


def main():
    root = pathlib.Path(__file__).resolve().parent.parent
    dirs = [pathlib.Path(d) for d in sys.argv[1:]] or sorted(root.glob("crates/*/src"))
    bad = 0
    for src in dirs:
        for parent, comp, graph in cycles(src):
            bad += 1
            where = "::".join(("crate",) + parent)
            links = ", ".join(
                f"{a} -> {b}" for a in comp for b in sorted(graph.get(a, ())) if b in comp
            )
            print(f"module cycle in {src.parent.name}, under {where}: {links}")
    if bad:
        sys.exit(1)
    print(f"module cycles: none in {len(dirs)} crates")


if __name__ == "__main__":
    main()
