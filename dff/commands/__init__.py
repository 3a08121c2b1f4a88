"""dff.commands: the command-line layer (DESIGN.md §12). argparse, output paths, committing or
discarding outputs and the human summaries live here, over the library (dff.runtime,
dff.export, dff.engines, dff.serve, dff.models); no library module imports from here.
"""
