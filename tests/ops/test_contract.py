"""The operator contract for every operator in memjax.ops: contract.py's tests over specs.py."""

from contract import *  # noqa: F401,F403  (the generic tests, collected here)
from specs import SPECS


def pytest_generate_tests(metafunc):
    """Parametrise by spec, and by form (the non-reference forms for gradient comparisons) or by
    bad input where the test asks for one."""
    names = metafunc.fixturenames
    if "bad" in names:
        cases = [(s, b) for s in SPECS for b in s.bad_inputs]
        metafunc.parametrize("spec, bad", cases, ids=[f"{s.id}-{b.id}" for s, b in cases])
    elif "form" in names:
        compared = "gradients_match_reference" in metafunc.function.__name__
        cases = [(s, f) for s in SPECS for f in s.forms if not (compared and f == "reference")]
        metafunc.parametrize("spec, form", cases, ids=[f"{s.id}-{f}" for s, f in cases])
    elif "spec" in names:
        metafunc.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
