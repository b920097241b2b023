"""DiffusionSeg engine: DDPM-pretrained U-Net segmentation of 13 abdominal organs in CT.

Importable without 3D Slicer; the Slicer module and the Training pipeline build on it.
"""

__version__ = "0.1.0"
