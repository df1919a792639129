"""tv_lossfix.builders: each builder has torchvision's signature plus loss_cfg (and the class-agnostic
switches), and a static docstring in its source that documents every parameter."""

import ast
import inspect

import pytest
from torchvision.models import detection as tvdet

import tv_lossfix
from tv_lossfix import builders

OURS = ("loss_cfg", "class_agnostic_bbox", "class_agnostic_mask")


def test_every_builder_is_exported_and_named_after_torchvisions():
    assert set(builders.BUILDERS) == {n for n in builders.__all__ if n in vars(tvdet)}
    for name, fn in builders.BUILDERS.items():
        assert getattr(tv_lossfix, name) is fn and fn.__name__ == name


@pytest.mark.parametrize("name", sorted(builders.BUILDERS))
def test_signature_is_torchvisions_plus_loss_cfg(name):
    theirs = inspect.signature(getattr(tvdet, name)).parameters
    ours = inspect.signature(builders.BUILDERS[name]).parameters
    # torchvision's parameters, in its order, with its kinds and defaults; ours go before **kwargs.
    want = [p for p in theirs if p != "kwargs"] + list(OURS) + ["kwargs"]
    assert list(ours) == want
    for p, param in theirs.items():
        assert (ours[p].kind, ours[p].default) == (param.kind, param.default), p
    assert ours["loss_cfg"].default is None and ours["loss_cfg"].kind is inspect.Parameter.KEYWORD_ONLY
    assert ours["class_agnostic_bbox"].default is False and ours["class_agnostic_mask"].default is False


@pytest.mark.parametrize("name", sorted(builders.BUILDERS))
def test_docstring_is_in_the_source_and_documents_every_parameter(name):
    fn = builders.BUILDERS[name]
    tree = ast.parse(inspect.getsource(builders))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    static = ast.get_docstring(node)
    assert static is not None and static == inspect.getdoc(fn)  # written out, not assembled at run time
    args = static.split("Args:", 1)[1].split("Returns:", 1)[0]
    # One entry per parameter, at the Args indentation, with a description.
    entries = dict(
        line.strip().split(": ", 1)
        for line in args.splitlines()
        if line.startswith("    ") and not line.startswith("     ")
    )
    names = ["**kwargs" if p == "kwargs" else p for p in inspect.signature(fn).parameters]
    assert list(entries) == names
    assert "LossConfig" in args.split("loss_cfg: ", 1)[1].split("class_agnostic_bbox: ", 1)[0]
    assert "Returns:" in static and "Example::" in static and f"tv_lossfix.{name}(" in static
