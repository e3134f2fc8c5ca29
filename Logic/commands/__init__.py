"""One module per ``dafne-slicer`` subcommand: ``register(parser)`` sets ``func``."""
