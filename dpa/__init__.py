"""DPA edge: Dual Prototype Attention video object segmentation, from PyTorch training to edge deployment.

The root package stays small: the command-line entry point, the project exception and shared constants.
The work lives in `dpa.training`, `dpa.export`, `dpa.runtime` and `dpa.calibration`.
"""

__version__ = "0.1.0"
