"""eval/mutation.py's source rewrite: properties become plain methods mutmut can mutate, behaviour unchanged."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _mutation_module():
    spec = importlib.util.spec_from_file_location("mutation_tool", REPO / "eval" / "mutation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SOURCE = '''
class Counts:
    def __init__(self, hits, trials):
        self.hits, self.trials = hits, trials

    @property
    def rate(self) -> float:
        """Hits per trial."""
        return self.hits / self.trials if self.trials else 0.0

    @staticmethod
    def unit() -> int:
        return 1

    @property
    def misses(self):
        return self.trials - self.hits
'''


def test_properties_become_plain_methods_with_the_same_behaviour() -> None:
    rewritten = _mutation_module().properties_as_plain_methods(SOURCE)
    tree = ast.parse(rewritten)
    methods = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert {"_property_rate", "_property_misses", "unit"} <= set(methods)
    assert all(not node.decorator_list for name, node in methods.items() if name.startswith("_property_"))
    assert [ast.unparse(d) for d in methods["unit"].decorator_list] == ["staticmethod"]  # other decorators stay
    original, new = {}, {}
    exec(SOURCE, original)
    exec(rewritten, new)
    for hits, trials in ((3, 4), (0, 0), (5, 5)):
        before, after = original["Counts"](hits, trials), new["Counts"](hits, trials)
        assert (after.rate, after.misses) == (before.rate, before.misses)
    assert isinstance(new["Counts"].__dict__["rate"], property)
    assert new["Counts"].__dict__["rate"].fget.__doc__ == "Hits per trial."


GRAD_SOURCE = '''
import torch


class Scaler:
    def __init__(self, weight):
        self.weight = weight

    @torch.no_grad()
    def scale(self, x):
        """Scale `x`; the grad mode seen inside is returned too."""
        message = """a multi-line string
    whose second line must keep its indentation"""
        y = x * self.weight
        return y, torch.is_grad_enabled(), message

    @staticmethod
    @torch.no_grad()
    def double(x):
        return 2 * x

    @torch.no_grad()
    def numbers(self, n):
        for i in range(n):  # a generator keeps its decorator: it re-enters the mode at each resumption
            yield torch.is_grad_enabled()


@torch.inference_mode
def infer(x):
    def helper(value):
        return value + 1

    return helper(x), torch.is_inference_mode_enabled()


@torch.no_grad()
def only_a_docstring():
    """Nothing else."""
'''


def test_grad_decorators_become_with_blocks_with_the_same_behaviour() -> None:
    import torch

    rewritten = _mutation_module().grad_decorators_as_with_blocks(GRAD_SOURCE)
    compile(rewritten, "rewritten", "exec")
    functions = {node.name: node for node in ast.walk(ast.parse(rewritten)) if isinstance(node, ast.FunctionDef)}
    # mutmut-visible: no decorator left but staticmethod (and the generator's, which is kept on purpose)
    assert not functions["scale"].decorator_list and not functions["infer"].decorator_list
    assert [ast.unparse(d) for d in functions["double"].decorator_list] == ["staticmethod"]
    assert [ast.unparse(d) for d in functions["numbers"].decorator_list] == ["torch.no_grad()"]
    assert isinstance(functions["scale"].body[1], ast.With) and len(functions["scale"].body) == 2
    original, new = {}, {}
    exec(GRAD_SOURCE, original)
    exec(rewritten, new)
    weight = torch.tensor([2.0, 3.0], requires_grad=True)
    x = torch.tensor([1.0, 1.0], requires_grad=True)
    for namespace in (original, new):
        y, grad_inside, message = namespace["Scaler"](weight).scale(x)
        assert (grad_inside, y.requires_grad) == (False, False) and torch.equal(y, torch.tensor([2.0, 3.0]))
        assert message == "a multi-line string\n    whose second line must keep its indentation"
        assert namespace["Scaler"].scale.__doc__ == "Scale `x`; the grad mode seen inside is returned too."
        assert namespace["Scaler"].double(x).requires_grad is False
        assert list(namespace["Scaler"](weight).numbers(2)) == [False, False]
        value, inference = namespace["infer"](torch.ones(1))
        assert inference is True and value.is_inference()
        assert namespace["only_a_docstring"]() is None
        assert namespace["only_a_docstring"].__doc__ == "Nothing else."
    assert torch.is_grad_enabled()  # the mode is restored after each call


class _LiftGradDecorators(ast.NodeTransformer):
    """The same rewrite on the syntax tree: what the text rewrite must produce, statement for statement."""

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.FunctionDef:
        self.generic_visit(node)
        grad = [d for d in node.decorator_list
                if ast.unparse(d.func if isinstance(d, ast.Call) else d) in ("torch.no_grad", "torch.inference_mode",
                                                                             "torch.enable_grad")]
        generator = any(isinstance(child, (ast.Yield, ast.YieldFrom)) for child in ast.walk(node)
                        if child is not node)
        if len(grad) != 1 or generator:
            return node
        node.decorator_list = [d for d in node.decorator_list if d is not grad[0]]
        docstring = (isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
                     and isinstance(node.body[0].value.value, str))
        head, rest = (node.body[:1], node.body[1:]) if docstring else ([], node.body)
        context = grad[0] if isinstance(grad[0], ast.Call) else ast.Call(func=grad[0], args=[], keywords=[])
        node.body = head + ([ast.With(items=[ast.withitem(context_expr=context)], body=rest)] if rest else [])
        return node


def test_grad_rewrite_of_the_library_changes_nothing_but_the_decorators() -> None:
    """Every module of massv with a torch decorator: the rewritten text parses to the original tree with each
    grad decorator lifted into a `with` block."""
    lift = _mutation_module().grad_decorators_as_with_blocks
    changed = []
    for path in sorted((REPO / "massv").rglob("*.py")):
        source = path.read_text()
        if "@torch." not in source:
            continue
        rewritten = lift(source)
        expected = ast.dump(_LiftGradDecorators().visit(ast.parse(source)))
        assert ast.dump(ast.parse(rewritten)) == expected, path
        if rewritten != source:
            changed.append(path.relative_to(REPO).as_posix())
    assert "massv/speculative/engine.py" in changed
    engine = ast.parse(lift((REPO / "massv/speculative/engine.py").read_text()))
    loop = next(node for node in ast.walk(engine)
                if isinstance(node, ast.FunctionDef) and node.name == "generate_from_inputs")
    assert not loop.decorator_list and isinstance(loop.body[-1], ast.With)


def test_earlier_survivors_are_read_from_mutmuts_results(tmp_path) -> None:
    import json

    tool = _mutation_module()
    meta = tmp_path / "mutants" / "massv" / "speculative" / "engine.py.meta"
    meta.parent.mkdir(parents=True)
    loop = "massv.speculative.engine.xǁSpeculativeGeneratorǁgenerate_from_inputs__mutmut_"
    block = "massv.speculative.engine.xǁSpeculativeGeneratorǁ_tree_block__mutmut_"
    meta.write_text(json.dumps({"exit_code_by_key": {loop + "1": 0, loop + "2": 1, loop + "3": None, loop + "4": 33,
                                                     block + "1": 0, block + "2": 36}}))
    files = [Path("massv/speculative/engine.py")]
    assert tool.earlier_survivors(tmp_path, files, []) == [loop + "1", loop + "4", block + "1"]
    assert tool.earlier_survivors(tmp_path, files, ["SpeculativeGenerator._tree_block"]) == [block + "1"]
