"""Mutation testing with mutmut: how many small deliberate bugs in the given modules do the given tests catch?

    python eval/mutation.py --modules massv/compress/sparsity.py --tests tests/test_compress.py
    python eval/mutation.py --name speculative --modules 'massv/speculative/*.py' \
        --tests tests/test_speculative.py tests/test_speculative_sampling.py

mutmut (pinned in the `mutation` extra: `pip install -e '.[dev,mutation]'`) copies the sources, plants one
change at a time (`<` for `<=`, `+ 1` for `+ 0`, a dropped argument, ...) and runs the tests that reach the
changed function; a mutant no test fails on "survived", and each survivor is either a missing test or an
equivalent change. The run happens in `runs/mutation/<name>/`: a copy of the repository's code and tests and a
`pyproject.toml` holding only this run's mutmut and pytest settings, so runs over different modules keep apart
and the working tree stays clean. It writes `report.json` and `report.md` there (kill rate per module and per
function, the diff of every survivor).

Not part of CI: a module takes minutes (massv/compress/sparsity.py: about 350 mutants, ~6 min on one core).
mutmut does not mutate functions with decorators other than `@classmethod`/`@staticmethod`, so the copy is
rewritten first: read-only `@property` methods become plain methods wrapped by `property(...)`, and a
`@torch.no_grad()` (`@torch.inference_mode()`, `@torch.enable_grad()`) function runs its body inside the same
`with` block instead (the engine loop, `SpeculativeGenerator.generate_from_inputs`, is one). The report lists
each module's functions that still got no mutants.

After writing tests for the survivors, run them again against the new tests (same --name, modules and tests):

    python eval/mutation.py --name engine --modules massv/speculative/engine.py --tests ... --keep --survivors
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tokenize
import tomllib
from collections import Counter, defaultdict
from pathlib import Path

logger = logging.getLogger("massv.mutation")

REPO = Path(__file__).resolve().parents[1]
# What the tests may read besides the library: configs, the engine benchmark script, data-prep scripts.
COPIED = ("massv", "tests", "configs", "eval", "data_prep")
# mutmut's exit codes, in mutmut's own words (mutmut/stats.py); "no tests" means no selected test reached it.
STATUS_BY_EXIT_CODE = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
                       35: "suspicious", 36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout",
                       255: "timeout", 37: "caught by type check", -11: "segfault", -9: "segfault"}
KILLED = {"killed", "timeout", "segfault"}  # the tests noticed: they failed, hung or crashed
# mutmut's names: `<module>.x_<function>__mutmut_<n>` and `<module>.xǁ<class>ǁ<method>__mutmut_<n>`.
MUTANT_NAME = re.compile(r"^(?P<module>[\w.]+?)\.x(?:ǁ(?P<cls>[^ǁ]+)ǁ|_)(?P<function>\w+?)__mutmut_(?P<number>\d+)$")


def toml_value(value: object) -> str:
    """TOML for the plain values these settings hold (strings, numbers, booleans, lists of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML here")


def run_settings(modules: list[str], tests: list[str]) -> str:
    """The work directory's pyproject.toml: this run's mutmut settings plus the repository's pytest settings."""
    pytest_settings = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    mutmut_settings = {
        "source_paths": ["massv"],
        "only_mutate": modules,
        "pytest_add_cli_args_test_selection": tests,
        "pytest_add_cli_args": ["-p", "no:cacheprovider"],
        "also_copy": [name for name in COPIED if name not in ("massv", "tests")],
        # Workers fork from a clean server process, not from the one that imported torch and ran the tests.
        "process_isolation": "forkserver",
        "use_git_change_detection": False,
    }
    lines = ["[tool.mutmut]", *(f"{key} = {toml_value(value)}" for key, value in mutmut_settings.items()),
             "", "[tool.pytest.ini_options]", *(f"{key} = {toml_value(value)}" for key, value in pytest_settings.items())]
    return "\n".join(lines) + "\n"


def prepare_work_dir(work_dir: Path, modules: list[str], tests: list[str], keep: bool) -> None:
    """A fresh copy of the code and tests (mutmut's cached results are dropped unless `keep`)."""
    if not keep and work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (work_dir / name).exists():
            shutil.rmtree(work_dir / name)
        shutil.copytree(REPO / name, work_dir / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for module in modules:  # in the copy only: the repository keeps its properties
        path = work_dir / module
        path.write_text(grad_decorators_as_with_blocks(properties_as_plain_methods(path.read_text())))
    (work_dir / "pyproject.toml").write_text(run_settings(modules, tests))


def properties_as_plain_methods(source: str) -> str:
    """Rewrite each read-only `@property def name(self)` as `def _property_name(self)` + `name = property(...)`.

    mutmut skips decorated functions, and a property (a statistic such as `acceptance_rate`) is exactly the
    code whose bugs change reported numbers. The rewrite keeps behaviour: the class attribute is the same
    property object around the same body, which mutmut can now mutate.
    """
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    edits: list[tuple[int, int, str, str]] = []  # (decorator line, def end line, name, indent)
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if (isinstance(item, ast.FunctionDef) and len(item.decorator_list) == 1
                    and isinstance(item.decorator_list[0], ast.Name) and item.decorator_list[0].id == "property"):
                indent = lines[item.lineno - 1][: len(lines[item.lineno - 1]) - len(lines[item.lineno - 1].lstrip())]
                edits.append((item.decorator_list[0].lineno, item.end_lineno, item.name, indent))
    for decorator_line, end_line, name, indent in sorted(edits, reverse=True):
        lines.insert(end_line, f"{indent}{name} = property(_property_{name})\n")
        definition = decorator_line  # the def line follows the decorator
        lines[definition] = lines[definition].replace(f"def {name}(", f"def _property_{name}(", 1)
        del lines[decorator_line - 1]
    return "".join(lines)


# The decorators lifted into `with` blocks by `grad_decorators_as_with_blocks` (as `@x()` or bare `@x`).
GRAD_DECORATORS = ("torch.no_grad", "torch.inference_mode", "torch.enable_grad")


def _grad_decorator(node: ast.expr) -> bool:
    target = node.func if isinstance(node, ast.Call) else node
    return ast.unparse(target) in GRAD_DECORATORS


def _lines_inside_strings(source: str) -> set[int]:
    """Line numbers that begin inside a multi-line string literal: indenting them would change the string."""
    inside: set[int] = set()
    fstring_starts: list[int] = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        kind = tokenize.tok_name[token.type]
        if kind == "STRING" and token.end[0] > token.start[0]:
            inside.update(range(token.start[0] + 1, token.end[0] + 1))
        elif kind == "FSTRING_START":  # Python >= 3.12 splits an f-string into tokens
            fstring_starts.append(token.start[0])
        elif kind == "FSTRING_END" and fstring_starts:
            inside.update(range(fstring_starts.pop() + 1, token.end[0] + 1))
    return inside


def _own_nodes(function: ast.FunctionDef):
    """The nodes of `function`'s body, not those of functions, lambdas or classes defined inside it."""
    stack = list(function.body)
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))


def _liftable(node: ast.AST) -> tuple[ast.expr, ast.stmt | None] | None:
    """(the grad decorator, the first statement after the docstring) when `node` can be rewritten."""
    if not isinstance(node, ast.FunctionDef):  # async functions keep their decorator
        return None
    decorators = [decorator for decorator in node.decorator_list if _grad_decorator(decorator)]
    if len(decorators) != 1:
        return None
    if any(isinstance(child, (ast.Yield, ast.YieldFrom)) for child in _own_nodes(node)):
        return None  # a generator: the decorator re-enters the mode at each resumption, a `with` block would not
    body = node.body
    has_docstring = (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                     and isinstance(body[0].value.value, str))
    if body[0].lineno == node.lineno:
        return None  # `def f(): ...` on one line
    if has_docstring and len(body) > 1 and body[1].lineno == body[0].end_lineno:
        return None  # `"""doc"""; statement`
    return decorators[0], (body[1] if len(body) > 1 else None) if has_docstring else body[0]


def grad_decorators_as_with_blocks(source: str) -> str:
    """Rewrite each `@torch.no_grad()` (`inference_mode`, `enable_grad`) function to run its body in a `with`.

    mutmut skips decorated functions, and the engine loop (`SpeculativeGenerator.generate_from_inputs`) carries
    `@torch.no_grad()`. In the copy the decorator line goes and the body after the docstring (which stays the
    function's `__doc__`) is indented under `with torch.no_grad():`, the context manager the decorator enters
    around every call: the behaviour is the same and mutmut mutates the body. Other decorators stay, and so
    does the grad decorator of a generator (it re-enters the mode at every resumption; a `with` block would
    not), of an async function and of a body written on the `def` line. Lines that begin inside a multi-line
    string are not re-indented, so string values do not change.
    """
    while True:  # one function per pass, re-parsed after each: nested decorated functions stay consistent
        tree = ast.parse(source)
        found = next(((node, lift) for node in ast.walk(tree) if (lift := _liftable(node)) is not None), None)
        if found is None:
            return source
        node, (decorator, first) = found
        lines = source.splitlines(keepends=True)
        if first is not None:
            in_strings = _lines_inside_strings(source)
            line = lines[first.lineno - 1]
            indent = line[: len(line) - len(line.lstrip())]
            step = "\t" if indent.startswith("\t") else "    "
            for number in range(first.lineno, node.end_lineno + 1):
                if number not in in_strings and lines[number - 1].strip():
                    lines[number - 1] = step + lines[number - 1]
            context = ast.get_source_segment(source, decorator)
            lines.insert(first.lineno - 1, f"{indent}with {context if isinstance(decorator, ast.Call) else context + '()'}:\n")
        del lines[decorator.lineno - 1 : decorator.end_lineno]
        source = "".join(lines)


def module_files(patterns: list[str]) -> list[Path]:
    files = sorted({path.relative_to(REPO) for pattern in patterns for path in REPO.glob(pattern) if path.suffix == ".py"})
    if not files:
        raise SystemExit(f"no Python files match {patterns}")
    return files


def mutmut_environment() -> dict[str, str]:
    """Import the copied code, not the checkout on PYTHONPATH; one thread per worker on a shared CPU."""
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    return environment


def mutant_function(name: str) -> str:
    """`massv.compress.sparsity.x_keep_mask__mutmut_3` -> `keep_mask`; methods as `SparsityMasks.apply_`."""
    match = MUTANT_NAME.match(name)
    if match is None:
        return name
    function = match["function"]
    return f"{match['cls']}.{function}" if match["cls"] else function


def defined_functions(path: Path) -> list[str]:
    """Top-level functions and methods of classes, named as `mutant_function` names them."""
    tree = ast.parse(path.read_text())
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.append(node.name)
        elif isinstance(node, ast.ClassDef):
            names.extend(f"{node.name}.{item.name}" for item in node.body
                         if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)))
    return names


def earlier_survivors(work_dir: Path, files: list[Path], functions: list[str]) -> list[str]:
    """The mutants an earlier run left alive (survived, or reached by no test), of `functions` if any given."""
    names = []
    for path in files:
        meta_path = work_dir / "mutants" / f"{path}.meta"
        if meta_path.exists():
            exit_codes = json.loads(meta_path.read_text())["exit_code_by_key"]
            names += [name for name, code in exit_codes.items()
                      if code is not None and STATUS_BY_EXIT_CODE.get(code) in ("survived", "no tests")
                      and (not functions or mutant_function(name) in functions)]
    return names


def mutant_diff(work_dir: Path, name: str) -> str:
    result = subprocess.run(["mutmut", "show", name], cwd=work_dir, env=mutmut_environment(),
                            capture_output=True, text=True, check=False)
    return result.stdout.strip() or result.stderr.strip()


def collect_report(work_dir: Path, files: list[Path], with_diffs: bool = True) -> dict:
    """Per module: counts by status, kill rate, per-function counts, survivors with their diffs."""
    report: dict = {"modules": {}}
    for path in files:
        meta_path = work_dir / "mutants" / f"{path}.meta"
        if not meta_path.exists():
            report["modules"][str(path)] = {"error": "no mutants (mutmut made none, or the run did not finish)"}
            continue
        exit_codes = json.loads(meta_path.read_text())["exit_code_by_key"]
        statuses = {name: STATUS_BY_EXIT_CODE.get(code, "not checked" if code is None else "suspicious")
                    for name, code in exit_codes.items()}
        counts = Counter(statuses.values())
        tested = len(statuses) - counts["skipped"] - counts["not checked"]
        killed = sum(counts[status] for status in KILLED)
        by_function: dict[str, Counter] = defaultdict(Counter)
        for name, status in statuses.items():
            by_function[mutant_function(name)][status] += 1
        # Not survivors: skipped ones, and those a partial run (--functions, a stopped run) never checked.
        survivors = sorted((name for name, status in statuses.items()
                            if status not in KILLED | {"skipped", "not checked"}),
                           key=lambda name: (mutant_function(name), int(name.rsplit("_", 1)[-1])))
        mutated = set(by_function)
        report["modules"][str(path)] = {
            "mutants": len(statuses),
            "killed": killed,
            "kill_rate": killed / tested if tested else None,
            "counts": dict(counts),
            "functions": {function: dict(counter) for function, counter in sorted(by_function.items())},
            "functions_without_mutants": [name for name in defined_functions(REPO / path) if name not in mutated],
            "survivors": [{"name": name, "function": mutant_function(name), "status": statuses[name],
                           **({"diff": mutant_diff(work_dir, name)} if with_diffs else {})} for name in survivors],
        }
    return report


def format_report(report: dict) -> str:
    lines = ["# Mutation testing", "", f"Tests: `{' '.join(report['tests'])}`", "",
             "| module | mutants | killed | kill rate | survived | no tests | timeout | not run |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for module, entry in report["modules"].items():
        if "error" in entry:
            lines.append(f"| {module} | {entry['error']} | | | | | | |")
            continue
        counts = entry["counts"]
        lines.append(f"| {module} | {entry['mutants']} | {entry['killed']} | {100 * entry['kill_rate']:.1f} % | "
                     f"{counts.get('survived', 0)} | {counts.get('no tests', 0)} | {counts.get('timeout', 0)} | "
                     f"{counts.get('not checked', 0)} |")
    for module, entry in report["modules"].items():
        if "error" in entry:
            continue
        lines += ["", f"## {module}", "", "| function | mutants | run | killed | not killed |", "|---|---:|---:|---:|---:|"]
        for function, counts in entry["functions"].items():
            killed = sum(counts.get(status, 0) for status in KILLED)
            total = sum(counts.values())
            run = total - counts.get("skipped", 0) - counts.get("not checked", 0)
            lines.append(f"| `{function}` | {total} | {run} | {killed} | {run - killed} |")
        if entry["functions_without_mutants"]:
            lines += ["", "No mutants (decorated, or nothing to mutate): "
                      + ", ".join(f"`{name}`" for name in entry["functions_without_mutants"])]
        for survivor in entry["survivors"]:
            lines += ["", f"### {survivor['name']} ({survivor['status']})"]
            if "diff" in survivor:
                lines += ["", "```diff", survivor["diff"], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", nargs="+", required=True, help="files to mutate, globs relative to the repository")
    parser.add_argument("--tests", nargs="+", required=True, help="pytest selection: test files or node ids")
    parser.add_argument("--functions", nargs="*", default=[],
                        help="mutate only these functions (`keep_mask`, `SparsityMasks.apply_`); default: all")
    parser.add_argument("--name", help="work directory under runs/mutation/ (default: the first module's stem)")
    parser.add_argument("--workers", type=int, default=1, help="parallel mutant workers (default 1: a shared CPU)")
    parser.add_argument("--keep", action="store_true", help="reuse mutmut's results from an earlier run of the same name")
    parser.add_argument("--survivors", action="store_true",
                        help="with --keep: run again only the earlier run's survivors (of --functions, if given), "
                             "against the current tests: after writing tests that should kill them")
    parser.add_argument("--no-diffs", action="store_true", help="skip `mutmut show` for every survivor")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if shutil.which("mutmut") is None:
        raise SystemExit("mutmut is not installed: pip install -e '.[mutation]'")
    files = module_files(args.modules)
    work_dir = REPO / "runs" / "mutation" / (args.name or files[0].stem)
    prepare_work_dir(work_dir, [str(path) for path in files], args.tests, args.keep)
    selection = []
    for function in args.functions:
        cls, _, method = function.rpartition(".")
        for path in files:
            module = ".".join(path.with_suffix("").parts)
            selection.append(f"{module}.xǁ{cls}ǁ{method}__mutmut_*" if cls else f"{module}.x_{method}__mutmut_*")
    if args.survivors:
        if not args.keep:
            raise SystemExit("--survivors re-runs an earlier run's survivors: it needs --keep")
        selection = earlier_survivors(work_dir, files, args.functions)
        if not selection:
            raise SystemExit(f"no survivors recorded in {work_dir}")
    command = ["mutmut", "run", "--max-children", str(args.workers), *selection]
    logger.info("mutating %s against %s in %s", ", ".join(map(str, files)), " ".join(args.tests), work_dir)
    with open(work_dir / "mutmut.log", "w") as log:
        returncode = subprocess.run(command, cwd=work_dir, env=mutmut_environment(), stdout=log,
                                    stderr=subprocess.STDOUT, check=False).returncode
    if returncode != 0:
        logger.error("mutmut run exited with %d; see %s", returncode, work_dir / "mutmut.log")
    report = {"tests": args.tests, "command": command, **collect_report(work_dir, files, not args.no_diffs)}
    (work_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = format_report(report)
    (work_dir / "report.md").write_text(markdown)
    print(markdown.split("\n## ")[0])
    logger.info("full report: %s", work_dir / "report.md")
    return returncode


if __name__ == "__main__":
    sys.exit(main())
