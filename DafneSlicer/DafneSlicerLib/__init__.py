"""DafneSlicer module internals: MRML glue, install, segmentation, learning and sync logic, widget.

The module needs the ``dafne_logic`` package. An extension build installs it beside the module
(``qt-scripted-modules/dafne_logic``). A source checkout added to Slicer through *Additional module
paths* (how developers try the module) has it as the ``Logic/`` folder beside ``DafneSlicer/``
instead: importing this package then registers that folder as ``dafne_logic``, for Slicer and for
the worker processes alike.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SOURCE_CHECKOUT = Path(__file__).resolve().parents[2]  # holds Logic/ and DafneSlicer/ in a source checkout


def use_source_checkout_logic(checkout: Path = SOURCE_CHECKOUT) -> bool:
    """Make ``checkout/Logic`` importable as ``dafne_logic`` unless a ``dafne_logic`` is installed;
    True if it did."""
    logic = checkout / "Logic"
    if "dafne_logic" in sys.modules or importlib.util.find_spec("dafne_logic") is not None \
            or not (logic / "__init__.py").is_file():
        return False
    spec = importlib.util.spec_from_file_location("dafne_logic", logic / "__init__.py",
                                                  submodule_search_locations=[str(logic)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["dafne_logic"] = module
    spec.loader.exec_module(module)
    return True


use_source_checkout_logic()
