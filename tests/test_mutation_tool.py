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
