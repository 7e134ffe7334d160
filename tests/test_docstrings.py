"""Every public function documents itself completely (Google style) and its example runs.

For each public function of ``flashdml`` (``__all__``), ``flashdml.metrics`` and ``flashdml.reference`` (the
package's and its modules' ``__all__``): the docstring opens with a one-line summary and has ``Returns:`` and
``Example:`` sections (and ``Args:`` when it takes parameters), ``Args:`` names every parameter of the
signature, and the doctest lines of the example run and print what they show. The classes of
``flashdml.losses`` and ``flashdml.integrations.pml`` are held to the same rules (their ``__init__``
parameters).
"""
from __future__ import annotations

import doctest
import importlib
import inspect
import re
import warnings

import pytest
import torch

import flashdml
import flashdml.metrics
import flashdml.reference

SECTIONS = ("Args:", "Returns:", "Example:")
SECTION_RE = re.compile(r"^\s*(Args|Arguments|Returns|Yields|Raises|Example|Examples|Note|Notes|See Also):\s*$")


def _public_functions(module, names):
    out = []
    for name in names:
        obj = getattr(module, name)
        if inspect.isfunction(obj) or (callable(obj) and not inspect.isclass(obj) and not inspect.ismodule(obj)):
            out.append((f"{module.__name__}.{name}", obj))
    return out


# by import path: flashdml.reference.similarity is also the name of the function the package re-exports
REFERENCE_MODULES = [importlib.import_module(f"flashdml.reference.{m}")
                     for m in ("similarity", "losses", "metrics", "contextual")]


def _unique(pairs):
    seen, out = set(), []
    for name, obj in pairs:
        if id(obj) not in seen:
            seen.add(id(obj))
            out.append((name, obj))
    return out


FUNCTIONS = _unique(
    _public_functions(flashdml, flashdml.__all__)
    + _public_functions(flashdml.metrics, flashdml.metrics.__all__)
    + _public_functions(flashdml.reference, flashdml.reference.__all__)
    # the reference modules' own public helpers (e.g. contextual_loss_terms)
    + [pair for mod in REFERENCE_MODULES for pair in _public_functions(mod, mod.__all__)]
)


def _classes():
    out = [(f"flashdml.losses.{n}", c) for n, c in vars(flashdml.losses).items()
           if inspect.isclass(c) and not n.startswith("_") and c.__module__ == flashdml.losses.__name__]
    try:
        from flashdml.integrations import pml
    except ImportError:  # pytorch-metric-learning is optional
        return out
    names = getattr(pml, "__all__", [n for n in vars(pml) if not n.startswith("_")])
    return out + [(f"flashdml.integrations.pml.{n}", getattr(pml, n)) for n in names
                  if inspect.isclass(getattr(pml, n))]


def _section(doc: str, title: str) -> list:
    """The lines of section ``title`` (e.g. "Args:") of a Google-style docstring, up to the next section."""
    lines = inspect.cleandoc(doc).splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == title]
    if not starts:
        return []
    body = []
    for line in lines[starts[0] + 1:]:
        if SECTION_RE.match(line):
            break
        body.append(line)
    return body


def _documented_params(doc: str) -> set:
    """Names documented in ``Args:``: entries ``name:`` or ``name (type):`` (``*args`` / ``**kwargs`` too)."""
    body = [line for line in _section(doc, "Args:") if line.strip()]
    if not body:
        return set()
    indent = len(body[0]) - len(body[0].lstrip())  # entries start here; continuation lines are deeper
    names = set()
    for line in body:
        m = re.match(r"\*{0,2}([A-Za-z_]\w*)\s*(\([^)]*\))?\s*:", line[indent:])
        if m and len(line) - len(line.lstrip()) == indent:
            names.add(m.group(1))
    return names


def _signature_params(obj) -> list:
    params = inspect.signature(obj).parameters
    return [p for p in params if p not in ("self", "cls")]


def _check_sections_and_params(qualname: str, obj, params):
    doc = inspect.getdoc(obj)
    assert doc, f"{qualname} has no docstring"
    summary = doc.splitlines()[0].strip()
    assert summary and not summary.endswith(":"), f"{qualname}: the first line must be a one-line summary"
    wanted = SECTIONS if params else tuple(s for s in SECTIONS if s != "Args:")  # no Args for f()
    missing = [s for s in wanted if s not in [line.strip() for line in doc.splitlines()]]
    assert not missing, f"{qualname}: docstring lacks the section(s) {missing}"
    undocumented = [p for p in params if p not in _documented_params(doc)]
    assert not undocumented, f"{qualname}: Args does not name the parameter(s) {undocumented}"
    assert any(line.strip().startswith(">>>") for line in _section(doc, "Example:")), (
        f"{qualname}: Example has no doctest line (>>>)")


def test_the_list_of_functions_is_complete():
    names = {n for n, _ in FUNCTIONS}
    for expected in ("flashdml.similarity", "flashdml.contextual_loss", "flashdml.get_backend",
                     "flashdml.backend", "flashdml.metrics.opis_thresholds", "flashdml.metrics.pr_auc_bounds",
                     "flashdml.reference.eps_opis", "flashdml.reference.contextual.contextual_loss_terms"):
        assert expected in names
    assert len(names) >= 13 + 8 + 15 + 2


@pytest.mark.parametrize("qualname,obj", FUNCTIONS, ids=[n for n, _ in FUNCTIONS])
def test_function_docstring_is_complete(qualname, obj):
    _check_sections_and_params(qualname, obj, _signature_params(obj))


def _run_examples(qualname: str, obj):
    """Runs the doctest lines of ``obj``'s docstring (not its members'); returns (examples, failures, report)."""
    tests = doctest.DocTestFinder(recurse=False).find(obj, qualname, globs={})
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list = []
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "auto" on an op without a compiled kernel warns once
        for t in tests:
            runner.run(t, out=report.append)
    return sum(len(t.examples) for t in tests), runner.failures, "".join(report)


@pytest.mark.parametrize("qualname,obj", FUNCTIONS, ids=[n for n, _ in FUNCTIONS])
def test_function_example_runs(qualname, obj):
    examples, failures, report = _run_examples(qualname, obj)
    assert examples > 0, f"{qualname}: no doctest example"
    assert failures == 0, f"{qualname}: the example fails:\n" + report
    assert flashdml.get_backend() == "auto", f"{qualname}: the example leaves a backend selected"


def test_example_runner_catches_a_wrong_output():
    def f():
        """Summary.

        Example:
            >>> import torch
            >>> torch.ones(2).sum().item()
            3.0
        """
    examples, failures, report = _run_examples("f", f)
    assert (examples, failures) == (2, 1)
    assert "Expected:" in report and "2.0" in report


def test_section_parser_catches_a_missing_parameter():
    def f(a, b, *, c=1, **options):
        """Summary.

        Args:
            a (int): first.
            b: second, with a long explanation that
                continues: on the next line.
            **options: more.

        Returns:
            nothing.

        Example:
            >>> 1 + 1
            2
        """
    assert _documented_params(inspect.getdoc(f)) == {"a", "b", "options"}
    with pytest.raises(AssertionError, match=r"\['c'\]"):
        _check_sections_and_params("f", f, _signature_params(f))


CLASSES = _classes()


@pytest.mark.parametrize("qualname,cls", CLASSES, ids=[n for n, _ in CLASSES])
def test_class_docstring_is_complete(qualname, cls):
    params = _signature_params(cls.__init__) if "__init__" in vars(cls) else []
    params = [p for p in params if p not in ("args", "kwargs")]
    _check_sections_and_params(qualname, cls, params)
    _, failures, report = _run_examples(qualname, cls)
    assert failures == 0, f"{qualname}: the example fails:\n" + report


def test_shared_doc_expands_whole_line_markers_only():
    from flashdml._docs import FRAGMENTS, shared_doc

    def f():
        """Summary.

        Args:
            {{gallery_args}}

        Example:
            >>> {1: 2}
            {1: 2}
        """
    shared_doc(f)
    assert "{{" not in f.__doc__ and "{1: 2}" in f.__doc__
    first = FRAGMENTS["gallery_args"].splitlines()[0]
    assert "\n            " + first + "\n" in f.__doc__  # indented like the marker
    assert "y" in _documented_params(inspect.getdoc(f)) and "ref_labels" in _documented_params(inspect.getdoc(f))

    def g():
        """Summary.

            {{no_such_fragment}}
        """
    with pytest.raises(KeyError):
        shared_doc(g)
