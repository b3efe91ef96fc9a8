"""The saliency-method registry: one spec per method drives METHODS, --help, the docs table and dispatch."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from lclsc_jax import cli, explain
from lclsc_jax.explain import registry

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "explain.md")


def test_methods_keep_their_names_and_order():
    assert explain.METHODS == (
        "sc", "gradcam", "hirescam", "gradcam++", "xgradcam", "layercam", "gradcam_elementwise", "eigencam",
        "scorecam", "ablationcam", "fullgrad", "crm", "occlusion", "superpixel", "gradient", "smoothgrad",
        "integrated_gradients", "perturbation_generator")
    assert explain.STAGE_METHODS == explain.GRADIENT_CAMS + ("eigencam", "scorecam", "ablationcam", "crm")
    assert set(explain.INPUT_METHODS) | set(explain.STAGE_METHODS) | {"sc"} == set(explain.METHODS)


@pytest.mark.parametrize("spec", registry.REGISTRY, ids=lambda s: s.name)
def test_every_spec_resolves_to_a_documented_function(spec):
    for ref in filter(None, (spec.function, spec.prepare)):
        fn = spec.resolve(ref)
        assert callable(fn) and fn.__doc__, ref
    assert spec.summary and "\n" not in spec.summary


def test_docs_methods_table_is_the_rendered_one():
    text = open(DOCS, encoding="utf-8").read()
    found = re.search(r"<!-- methods-table:[^\n]*-->\n(.*?)\n<!-- end methods-table -->", text, re.S)
    assert found, "docs/explain.md lost its methods-table markers"
    assert found.group(1) == registry.methods_table(), "regenerate with registry.methods_table()"


def test_explain_help_lists_every_method_with_its_summary():
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    text = sub.choices["explain"].format_help()
    for spec in registry.REGISTRY:
        assert re.search(rf"^\s+{re.escape(spec.name)}\s+{re.escape(spec.summary)}$", text, re.M), spec.name


def test_the_registry_imports_without_jax():
    code = "import sys; import lclsc_jax.explain.registry as r; assert r.METHODS; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_method_names_the_close_one():
    with pytest.raises(ValueError, match="did you mean 'layercam'"):
        registry.get("layer-cam")
    with pytest.raises(ValueError, match="unknown saliency method"):
        explain.saliency("nonsense", None, None, None)
