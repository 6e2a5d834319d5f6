#!/usr/bin/env python3
"""Fails when a package of the committed Cargo.lock needs a newer Rust than the workspace
member that uses it declares in `rust-version`.

Reads `cargo metadata --format-version 1 --locked [feature flags]` on stdin. For each workspace
member it walks the resolved graph: the member's own dependencies of every kind (normal, build,
dev: the tests are built with the same toolchain), then only the normal and build dependencies
of what it reaches. Every target platform counts (a user on another OS builds those too).
A package that declares no `rust-version` is not checked (cargo has no figure for it either).

Only the declared figures are compared; the toolchain installed here is newer than any of them,
so this is what keeps the claim in Cargo.toml honest when the lock moves.
"""

import json
import sys


def version_key(text):
    """"1.88" and "1.88.0" are the same requirement."""
    parts = [int(part) for part in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def main():
    metadata = json.load(sys.stdin)
    packages = {p["id"]: p for p in metadata["packages"]}
    deps_of = {node["id"]: node["deps"] for node in metadata["resolve"]["nodes"]}
    failures = []
    for member in metadata["workspace_members"]:
        declared = packages[member]["rust_version"]
        name = packages[member]["name"]
        if declared is None:
            failures.append(f"{name} declares no rust-version")
            continue
        seen = set()
        stack = [(member, True)]
        newest = ("0", None)
        while stack:
            node, is_root = stack.pop()
            for dep in deps_of.get(node, []):
                kinds = {k["kind"] for k in dep["dep_kinds"]}
                if not is_root and not kinds & {None, "build"}:
                    continue
                if dep["pkg"] in seen:
                    continue
                seen.add(dep["pkg"])
                stack.append((dep["pkg"], False))
                package = packages[dep["pkg"]]
                needs = package["rust_version"]
                if needs is None:
                    continue
                label = f'{package["name"]} {package["version"]}'
                if version_key(needs) > version_key(newest[0]):
                    newest = (needs, label)
                if version_key(needs) > version_key(declared):
                    failures.append(
                        f"{name} declares rust-version {declared}, but the lock's {label} "
                        f"needs {needs}"
                    )
        print(
            f"{name}: rust-version {declared}; {len(seen)} locked dependencies, the newest "
            f"requirement {newest[0]} ({newest[1]})"
        )
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
