"""mapl-ray: MAPL surface-defect detection (MemSeg + SPADE-style pseudo-labeling) on Ray."""

__version__ = "0.1.0"
