"""Examples of dff-trt used from the outside (importable from the repo root for dff-export)."""
