"""dff.serve: DFF on Triton Inference Server (DESIGN.md §9).

`repository` writes a model repository (the `feature`, `flow` and `task` stage models and the
`dff` BLS model that owns each stream's key frame), `server` starts and stops Triton's server
binary, `cli` is the `dff-serve` command. `stage_model.py` and `dff_model.py` are the
Python-backend models copied into a repository, and `triton_tensors.py` their NumPy 2 tensor
helpers; those three run inside the server's Python stub, not here.
"""
