"""DafneSlicer module internals: MRML glue, install, segmentation, learning and sync logic, widget."""
