"""Sphinx configuration of the labeltransfer documentation."""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import sys
from datetime import datetime
from importlib.metadata import metadata
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "extensions"))

# -- Project information -------------------------------------------------------------------------
info = metadata("labeltransfer")
project = "labeltransfer"
author = info.get("Author") or "labeltransfer developers"
copyright = f"{datetime.now():%Y}, {author}"
version = info["Version"]
release = version

# -- Tutorials -----------------------------------------------------------------------------------
# The notebooks live in ``tutorials/`` at the repository root (executed there, tested by
# ``tests/test_tutorials.py``). Sphinx only reads files under ``docs/``, so they are copied into
# ``docs/tutorials/`` (ignored by git) before each build; unchanged files are not touched so
# incremental builds stay incremental.
TUTORIALS_SRC = ROOT / "tutorials"
TUTORIALS_DST = HERE / "tutorials"
_sources = {notebook.name: notebook for notebook in TUTORIALS_SRC.glob("*.ipynb")}
for stale in TUTORIALS_DST.glob("*.ipynb"):
    if stale.name not in _sources:  # the original was removed or renamed
        stale.unlink()
for name, notebook in sorted(_sources.items()):
    target = TUTORIALS_DST / name
    if not target.exists() or not filecmp.cmp(notebook, target, shallow=False):
        shutil.copy2(notebook, target)

# -- General configuration -----------------------------------------------------------------------
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx_autodoc_typehints",
    "sphinx_copybutton",
    "sphinxcontrib.bibtex",
    "api_check",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "extensions"]
source_suffix = {".rst": "restructuredtext", ".ipynb": "myst-nb", ".md": "myst-nb"}
master_doc = "index"
default_role = "literal"
pygments_style = "default"

# Broken references are not errors (many come from scvi-tools' and Lightning's docstrings,
# whose inventories cannot be fetched offline); real docutils/autodoc problems are, with -W.
nitpicky = False
suppress_warnings = [
    # TYPE_CHECKING-only imports cannot be resolved when rendering type hints.
    "sphinx_autodoc_typehints.forward_reference",
    "sphinx_autodoc_typehints.guarded_import",
    # Notebook outputs of a mime type we do not render (e.g. widget state).
    "mystnb.unknown_mime_type",
]

# -- autodoc / autosummary / napoleon ------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = False
autodoc_member_order = "groupwise"
autodoc_typehints = "description"
autodoc_mock_imports: list[str] = []
autoclass_content = "class"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True
napoleon_use_param = True
napoleon_custom_sections = [("Params", "Parameters")]
typehints_defaults = "braces"
always_document_param_types = False
typehints_document_rtype = True

# -- bibliography --------------------------------------------------------------------------------
bibtex_bibfiles = ["references.bib"]
bibtex_reference_style = "author_year"
bibtex_default_style = "alpha"

# -- MyST / myst-nb ------------------------------------------------------------------------------
myst_enable_extensions = [
    "amsmath",
    "colon_fence",
    "deflist",
    "dollarmath",
    "html_image",
    "html_admonition",
]
myst_heading_anchors = 3
myst_url_schemes = ("http", "https", "mailto")
nb_execution_mode = "off"  # notebooks are executed locally, outputs are stored in them
nb_merge_streams = True
nb_output_stderr = "remove"

# -- intersphinx ---------------------------------------------------------------------------------
# Fetching inventories needs network access, so links to the other projects' documentation are
# only made on Read the Docs (which sets READTHEDOCS) or with LABELTRANSFER_DOCS_INTERSPHINX=1.
_INTERSPHINX = {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "pandas": ("https://pandas.pydata.org/docs/", None),
    "scipy": ("https://docs.scipy.org/doc/scipy/", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "scvi": ("https://docs.scvi-tools.org/en/stable/", None),
    "torch": ("https://docs.pytorch.org/docs/stable/", None),
    "lightning": ("https://lightning.ai/docs/pytorch/stable/", None),
    "matplotlib": ("https://matplotlib.org/stable/", None),
}
_online = os.environ.get("LABELTRANSFER_DOCS_INTERSPHINX") or os.environ.get("READTHEDOCS")
intersphinx_mapping = _INTERSPHINX if _online else {}
intersphinx_timeout = 10

# -- HTML output ---------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_static_path = ["_static"]
html_css_files = ["css/custom.css"]
html_title = "labeltransfer"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
html_show_sphinx = False


# -- Inherited members ---------------------------------------------------------------------------
# Class pages list inherited members (e.g. ``JIND.annotate`` from ``AnnotationMixin``, ``save``
# and ``view_anndata_setup`` from scvi-tools' ``BaseModelClass``) but not the dozens of hooks
# that Lightning and PyTorch base classes define: those are documented upstream.
_DOCUMENTED_ORIGINS = ("labeltransfer", "scvi.model.base")


def _skip_foreign_members(app, what, name, obj, skip, options):
    if what != "class":
        return None
    target = obj.fget if isinstance(obj, property) else getattr(obj, "__func__", obj)
    module = getattr(target, "__module__", None)
    if not isinstance(module, str) or module.startswith(_DOCUMENTED_ORIGINS):
        return None
    return True


# -- Prose "Returns" sections -----------------------------------------------------------------
# The package writes scanpy-style prose in "Returns" ("Array of shape ``(n, d)``."). Napoleon
# reads the first line of a numpydoc Returns section as a *type*, so a prose-only section would
# be shown as the return type. Before napoleon runs, such a section becomes one entry with
# neither name nor type (a ``:`` line, then the indented prose), which napoleon renders as a
# ``:returns:`` field; the return type then comes from the annotation. Sections with entries (indented
# descriptions) are left to napoleon.
_SECTION_RULE = re.compile(r"^\s*-{3,}\s*$")
_TYPE_LIKE = re.compile(r"^[\w.\[\], |`~:]+$")


def _is_prose(lines: list[str]) -> bool:
    text = " ".join(line.strip() for line in lines).strip()
    if not text or any(line.startswith((" ", "\t")) for line in lines if line.strip()):
        return False
    first = lines[0].strip()
    return text.endswith(".") or " : " not in first and not _TYPE_LIKE.match(first)


def _prose_returns(app, what, name, obj, options, lines):
    for i in range(len(lines) - 1):
        if lines[i].strip() == "Returns" and _SECTION_RULE.match(lines[i + 1]):
            start = i + 2
            end = start
            while end < len(lines) and not (
                end + 1 < len(lines) and lines[end].strip() and _SECTION_RULE.match(lines[end + 1])
            ):
                end += 1
            body = lines[start:end]
            while body and not body[-1].strip():
                body.pop()
            if _is_prose(body):
                # an entry with neither name nor type: napoleon renders ":returns: <prose>"
                lines[start:end] = [":", *(f"    {line}" for line in body), ""]
            return


def setup(app):
    """Connect the member filter and the Returns rewriting (before napoleon, priority 500)."""
    app.connect("autodoc-skip-member", _skip_foreign_members)
    app.connect("autodoc-process-docstring", _prose_returns, priority=400)
