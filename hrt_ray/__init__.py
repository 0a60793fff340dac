"""hrt-ray: HRFormer (High-Resolution Transformer) + OCR semantic segmentation on Ray.

Data flows one way: ``config`` -> ``data`` -> ``models`` -> ``train``/``eval`` -> reports.
"""

__version__ = "0.1.0"
