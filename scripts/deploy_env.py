#!/usr/bin/env python3
"""The environment variables of ddpm-trainer and ddpm-server, as the binaries describe them.

The CLI definitions (clap, `#[arg(long, env = "DDPM_…")]`) are the single source of
truth; each binary prints its options as JSON (`--cli-spec`, walked from clap's
`Command` by crates/ddpm-service/src/cli_spec.rs); this reads that and

  table   prints the Markdown table of every variable (scripts/gen-env-docs.sh puts it
          into the docs),
  check   fails unless the deployment files agree with the binaries:
            - every option of both binaries has an environment variable;
            - every DDPM_* variable in deploy/.env.example is accepted by a binary, is
              passed by the compose file to a service, and a commented-out default there
              is the binary's default;
            - every other variable in .env.example is used by the compose file;
            - every variable the compose file passes to a ddpm service is accepted by that
              service's binary and listed in .env.example; no DDPM_* variable goes to
              another service;
            - every ${VAR} the compose file interpolates is listed in .env.example;
            - every DDPM_* variable the Dockerfile sets is accepted by the binaries of the
              targets that inherit it.

Usage:
  deploy_env.py --bin-dir DIR table
  deploy_env.py --bin-dir DIR check --env-file deploy/.env.example \\
      --compose BIN --compose-file deploy/docker-compose.yml [--compose-file …] \\
      --dockerfile docker/Dockerfile
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("ddpm-server", "ddpm-trainer")
# Which binary a compose service or Dockerfile target runs, by build target or image name.
TARGET_BINARY = {"server": "ddpm-server", "trainer": "ddpm-trainer"}

@dataclass
class Option:
    binary: str
    command: tuple[str, ...]  # () for the top level
    flag: str
    env: str | None
    default: str | None
    possible: list[str]
    about: str


@dataclass
class Variable:
    """One variable of one binary, with the commands that read it."""

    name: str
    binary: str
    flag: str
    default: str | None
    possible: list[str]
    about: str
    commands: list[tuple[str, ...]] = field(default_factory=list)
    is_global: bool = False


def collect(bin_dir: Path) -> list[Option]:
    """Every option of every (sub)command of both binaries, as each describes its own
    clap definition (`<binary> --cli-spec`: crates/ddpm-service/src/cli_spec.rs)."""
    options: list[Option] = []
    for binary in BINARIES:
        path = bin_dir / binary
        if not os.access(path, os.X_OK):
            sys.exit(f"deploy_env: {path} is not an executable")
        # A clean environment: no DDPM_* value can change what the binary reports.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
        out = subprocess.run([str(path), "--cli-spec"], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"deploy_env: `{binary} --cli-spec` failed:\n{out.stderr}")
        for o in json.loads(out.stdout):
            options.append(Option(
                binary=binary,
                command=tuple(o["command"]),
                flag=o["flag"],
                env=o["env"],
                default=o["default"],
                possible=o["possible"],
                about=o["about"],
            ))
    return options


def variables(options: list[Option]) -> dict[str, dict[str, Variable]]:
    """binary -> variable name -> Variable (commands merged, globals marked)."""
    result: dict[str, dict[str, Variable]] = {b: {} for b in BINARIES}
    top_level = {(o.binary, o.env) for o in options if o.command == () and o.env}
    for o in options:
        if o.env is None:
            continue
        v = result[o.binary].get(o.env)
        if v is None:
            v = result[o.binary][o.env] = Variable(
                name=o.env,
                binary=o.binary,
                flag=o.flag,
                default=o.default,
                possible=o.possible,
                about=o.about,
                is_global=(o.binary, o.env) in top_level,
            )
        if o.command not in v.commands:
            v.commands.append(o.command)
    return result


# ---- table ------------------------------------------------------------------------------


def md(text: str) -> str:
    """Markdown-safe cell text: pipes escaped, and angle brackets outside code spans."""
    parts = text.replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def readers(v: Variable) -> str:
    short = v.binary.removeprefix("ddpm-")
    if v.is_global or v.commands == [()]:
        return short
    commands = sorted({" ".join(c) for c in v.commands})
    return short + " " + ", ".join(f"`{c}`" for c in commands)


def table(vars_by_binary: dict[str, dict[str, Variable]]) -> str:
    rows: list[tuple[str, str, str, str, str]] = []
    server, trainer = vars_by_binary["ddpm-server"], vars_by_binary["ddpm-trainer"]

    def row(v: Variable, read_by: str):
        about = v.about
        if v.possible:
            if about and not about.endswith((".", ":", ";")):
                about += "."
            about += (" " if about else "") + "One of " + ", ".join(f"`{p}`" for p in v.possible) + "."
        # A default clap prints is a value (code); one written into the help text may be prose.
        default = v.default or ""
        if default and " " not in default:
            default = f"`{default}`"
        rows.append((f"`{v.name}`", f"`{v.flag}`", read_by, md(default), md(about)))

    # Shared variables first (one row where both binaries mean the same), then each
    # binary's own, in the order of its --help.
    for name, s in server.items():
        t = trainer.get(name)
        if t is None:
            continue
        if (s.about, s.default, s.possible) == (t.about, t.default, t.possible) and t.is_global:
            row(s, "server, trainer")
        else:
            row(s, readers(s))
            row(t, readers(t))
    for name, s in server.items():
        if name not in trainer:
            row(s, readers(s))
    for name, t in trainer.items():
        if name not in server:
            row(t, readers(t))

    lines = [
        "| Variable | Flag | Read by | Default | Meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ---- check ------------------------------------------------------------------------------

ENV_LINE = re.compile(r"^(#\s?)?([A-Z][A-Z0-9_]*)=(.*)$")
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")


@dataclass
class EnvEntry:
    name: str
    value: str
    commented: bool
    line: int


def read_env_example(path: Path) -> dict[str, EnvEntry]:
    entries: dict[str, EnvEntry] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        m = ENV_LINE.match(raw.strip())
        if not m:
            continue
        value = m.group(3).split(" #")[0].strip().strip('"').strip("'")
        entries.setdefault(m.group(2), EnvEntry(m.group(2), value, m.group(1) is not None, n))
    return entries


def compose_config(compose: str, files: list[Path], env_file: Path) -> dict:
    cmd = [compose]
    for f in files:
        cmd += ["-f", str(f)]
    cmd += ["--env-file", str(env_file), "config", "--format", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"deploy_env: `{' '.join(cmd)}` failed:\n{out.stderr}")
    return json.loads(out.stdout)


def service_binary(name: str, service: dict) -> str | None:
    target = (service.get("build") or {}).get("target")
    if target in TARGET_BINARY:
        return TARGET_BINARY[target]
    image = service.get("image") or ""
    for binary in BINARIES:
        if binary in image:
            return binary
    return None


def dockerfile_stages(path: Path) -> tuple[dict[str, str], list[tuple[str, str, int]]]:
    """The stages (name -> the image or stage it starts FROM) and (stage, variable, line)
    for every variable an ENV instruction sets."""
    parents: dict[str, str] = {}
    found = []
    stage = ""
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        n = i + 1
        line = lines[i]
        while line.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line.rstrip()[:-1] + " " + lines[i]
        words = [w for w in line.split() if not w.startswith("--")]
        if words and words[0].upper() == "FROM":
            lowered = [w.lower() for w in words]
            stage = words[lowered.index("as") + 1] if "as" in lowered else f"#{n}"
            parents[stage] = words[1]
        elif words and words[0].upper() == "ENV":
            for token in words[1:]:
                if "=" in token:
                    found.append((stage, token.split("=", 1)[0], n))
        i += 1
    return parents, found


def stage_binaries(parents: dict[str, str], stage: str) -> list[str]:
    """The binaries whose target stage is `stage` or starts from it (a FROM that names a
    build argument, `runtime-${VARIANT}`, may be any stage it can expand to)."""

    def ancestors(name: str, seen: set[str]) -> set[str]:
        parent = parents.get(name)
        if parent is None or name in seen:
            return set()
        seen.add(name)
        pieces = re.split(r"\$\{[^}]*\}", parent)
        if not "".join(pieces):  # FROM ${IMAGE}: an image named by a build argument
            return set()
        pattern = re.compile("^" + ".*".join(map(re.escape, pieces)) + "$")
        matches = {s for s in parents if pattern.match(s)}
        result = set(matches)
        for m in matches:
            result |= ancestors(m, seen)
        return result

    return [b for target, b in TARGET_BINARY.items()
            if target in parents and (stage == target or stage in ancestors(target, set()))]


def check(args, vars_by_binary: dict[str, dict[str, Variable]], options: list[Option]) -> int:
    errors: list[str] = []
    accepted = {b: set(v) for b, v in vars_by_binary.items()}
    any_binary = set().union(*accepted.values())

    # Configuration parity: every setting can come from the environment.
    for o in options:
        if o.env is None and o.flag not in ("--help", "--version"):
            cmd = " ".join((o.binary, *o.command))
            errors.append(f"{cmd}: option {o.flag} has no environment variable (add env = \"DDPM_…\")")

    env_file = Path(args.env_file)
    example = read_env_example(env_file)
    compose_files = [Path(f) for f in args.compose_file]
    compose_text = "\n".join(f.read_text() for f in compose_files)
    interpolated = set(INTERPOLATION.findall(compose_text))
    # Listed for another configuration's override: used, though not by this one.
    used_elsewhere = set()
    for f in args.other_compose_file:
        used_elsewhere |= set(INTERPOLATION.findall(Path(f).read_text()))

    config = compose_config(args.compose, compose_files, env_file)
    passed: dict[str, set[str]] = {}  # variable -> services
    for name, service in (config.get("services") or {}).items():
        binary = service_binary(name, service)
        env = service.get("environment") or {}
        for var in env:
            passed.setdefault(var, set()).add(name)
            if binary is None:
                if var.startswith("DDPM_"):
                    errors.append(f"compose: service {name} is not a ddpm service but gets {var}")
                continue
            if var not in accepted[binary]:
                errors.append(f"compose: service {name} gets {var}, which {binary} does not accept")
            if var not in example:
                errors.append(f"compose: service {name} gets {var}, which {env_file} does not list")

    for var in sorted(interpolated):
        if var not in example:
            errors.append(f"compose: interpolates ${{{var}}}, which {env_file} does not list")

    for var, entry in example.items():
        where = f"{env_file}:{entry.line}"
        # A binary's variable: DDPM_*, or a conventional name it reads (AWS_*).
        if var.startswith("DDPM_") or var in any_binary:
            if var not in any_binary:
                errors.append(f"{where}: {var} is not accepted by {' or '.join(BINARIES)}")
                continue
            services = passed.get(var, set())
            if not services:
                errors.append(f"{where}: {var} is passed to no service by the compose file")
            if entry.commented and entry.value:
                for service in sorted(services):
                    binary = service_binary(service, config["services"][service])
                    v = vars_by_binary.get(binary, {}).get(var) if binary else None
                    if v and v.default is not None and v.default != entry.value:
                        errors.append(
                            f"{where}: {var} is documented as {entry.value!r}, "
                            f"but {binary}'s default is {v.default!r}"
                        )
        elif var not in interpolated and var not in used_elsewhere:
            errors.append(f"{where}: {var} is used neither by a binary nor by the compose file")

    for df in args.dockerfile or []:
        path = Path(df)
        parents, env = dockerfile_stages(path)
        for target in TARGET_BINARY:
            if target not in parents:
                errors.append(f"{path}: no stage named {target}")
        for stage, var, line in env:
            if not var.startswith("DDPM_"):
                continue
            for binary in stage_binaries(parents, stage):
                if var not in accepted[binary]:
                    errors.append(f"{path}:{line}: ENV {var} (stage {stage}) is not accepted by {binary}")

    for e in errors:
        print(f"deploy_env: {e}", file=sys.stderr)
    if errors:
        print(f"deploy_env: {len(errors)} problem(s)", file=sys.stderr)
        return 1
    n = sum(len(v) for v in vars_by_binary.values())
    print(
        f"deploy_env: ok: {n} variables of {len(BINARIES)} binaries; "
        f"{len(example)} in {env_file}; {len(passed)} passed by {', '.join(map(str, compose_files))}"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin-dir", required=True, help="folder holding ddpm-trainer and ddpm-server")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("table", help="print the Markdown table of every variable")
    c = sub.add_parser("check", help="check the deployment files against the binaries")
    c.add_argument("--env-file", required=True)
    c.add_argument("--compose", required=True, help="a compose implementation (docker-compose v2)")
    c.add_argument("--compose-file", action="append", required=True)
    c.add_argument(
        "--other-compose-file",
        action="append",
        default=[],
        help="an override not in this configuration whose ${…} still use .env.example's "
        "variables (the S3 override's MinIO credentials)",
    )
    c.add_argument("--dockerfile", action="append")
    args = parser.parse_args()

    options = collect(Path(args.bin_dir))
    vars_by_binary = variables(options)
    if args.cmd == "table":
        sys.stdout.write(table(vars_by_binary))
        return 0
    return check(args, vars_by_binary, options)


if __name__ == "__main__":
    sys.exit(main())
