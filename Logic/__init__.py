"""DafneSlicer core logic: no Slicer or Qt imports, usable from plain Python and the command line."""

__version__ = "0.1.0"
