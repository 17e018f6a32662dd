"""Capacity planning from the same config objects and counting code as the model.

`catalog` (chips, with sources), `formulas` (every formula, derived in docstrings),
`train` / `serve` (the plans), `compare` (all chips side by side, plots), `report`
(rich tables). See docs/planning.md.
"""
